"""Service settings, read from `SPO_*` environment variables (pydantic-settings); CLI flags override them.

One `Settings` object is shared by the API, the worker and `spo serve`, so a deployment sets each knob once.
Lists (`SPO_MODELS`, `SPO_API_KEYS`) are comma-separated.

Auth fails closed: a keys setting that is given but yields no key (`SPO_API_KEYS=" "` or `","`, a keys file with only
comments or blank lines, a keys file that cannot be read) stops start-up with a message, instead of serving without
auth. Only an unset (or empty) SPO_API_KEYS with no SPO_API_KEYS_FILE means "no auth".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "models.yaml"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ConfigError(RuntimeError):
    """A setting that must stop start-up (its message names the setting and what to do)."""


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every tunable of the service. Field `x` is read from env `SPO_X`."""

    model_config = SettingsConfigDict(env_prefix="SPO_", extra="ignore")

    # Where things are
    redis_url: str | None = Field(None, description="Redis URL; unset: `spo serve` starts a private embedded Redis")
    key_prefix: str = Field("spo", description="prefix of every Redis key, so several deployments share a server")
    manifest: Path = Field(DEFAULT_MANIFEST, description="served-model manifest (YAML)")
    models: CsvList = Field(default_factory=list, description="models to serve; empty: every model of the manifest "
                                                              "(API) / the first one (worker)")

    # Auth
    api_keys: CsvList = Field(default_factory=list, description="accepted Bearer keys; empty and no keys file: no auth")
    api_keys_file: Path | None = Field(None, description="file with one key per line ('#' starts a comment)")
    rate_limit_per_minute: int = Field(0, ge=0, description="submissions per minute per key (0: unlimited)")

    # Queue
    queue_max_length: int = Field(256, ge=1, description="queued + running jobs per model before 429")
    job_ttl_s: int = Field(3600, ge=10, description="how long job records and images are kept")
    visibility_timeout_s: float = Field(60.0, gt=0, description="a claimed job idle this long is reclaimed")
    max_attempts: int = Field(3, ge=1, description="claims of one job before it fails to the dead-letter stream")
    sync_timeout_s: float = Field(300.0, gt=0, description="how long POST /v1/images/generations waits")

    # Worker
    max_batch: int = Field(8, ge=1, description="images per pipeline call")
    max_wait_ms: int = Field(20, ge=0, description="how long a worker waits to fill a batch")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="how often a worker writes its heartbeat")
    worker_stale_s: float = Field(15.0, gt=0, description="a worker silent this long is not counted as serving")
    device: str | None = Field(None, description="override the manifest's device (cpu, cuda, cuda:1)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads in the worker")
    engine_cache: Path = Field(Path("~/.cache/spo-diffusion/engines"),
                               description="compiled-artifact cache (ONNX files, TensorRT engines)")
    compile_mode: str | None = Field(None, description="torch.compile mode of the compile backend (unset: default, "
                                                       "or reduce-overhead with the manifest's cuda_graphs)")

    # Logs
    log_level: str = Field("INFO", description="log level of every `spo` process (DEBUG, INFO, WARNING, ...)")
    log_format: Literal["text", "json"] = Field("text", description="text: one readable line per record; json: one "
                                                                    "JSON object per line, for log pipelines")

    # The web playground at / (service.api.playground)
    playground: bool = Field(True, description="serve the web playground at / (false: / is a 404)")

    # HTTP (enforced by the API's server, whatever its HTTP parser: service.api.server)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted request body (413 past it)")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="largest request line + headers (431 past it)")
    request_timeout_s: float = Field(15.0, gt=0, description="a request's line, headers and body must all arrive "
                                                             "within this long of its first byte (408 past it)")
    keepalive_timeout_s: float = Field(5.0, gt=0, description="an idle connection (no request in progress) is "
                                                              "closed after this long")

    @field_validator("models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_csv(cls, value: object) -> object:
        keys = _split_csv(value)
        if isinstance(value, str) and value != "" and not keys:
            # " " or "," is a keys setting that yields no key: serving without auth would be the surprise
            raise ValueError(f"{value!r} contains no API key (keys are comma-separated); unset it, or set it to the "
                             f"empty string, to run without auth")
        if isinstance(keys, list) and any(not isinstance(k, str) or not k.strip() for k in keys):
            raise ValueError("API keys must be non-blank strings")
        return keys

    def load_api_keys(self) -> list[str]:
        """Keys from SPO_API_KEYS plus the keys file; an empty list means auth is off, which only an unset
        SPO_API_KEYS_FILE and an empty SPO_API_KEYS give. Raises ConfigError for a keys file that cannot be read or
        holds no key (auth fails closed)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"SPO_API_KEYS_FILE={self.api_keys_file}: cannot read it ({err}); refusing to start "
                                  f"without the API keys it should hold") from None
            found = [line for line in (raw.split("#", 1)[0].strip() for raw in text.splitlines()) if line]
            if not found:
                raise ConfigError(f"SPO_API_KEYS_FILE={self.api_keys_file} holds no API key (only blank lines or "
                                  f"'#' comments); refusing to start without auth. Put one key per line, or unset "
                                  f"SPO_API_KEYS_FILE to run without auth")
            keys += found
        return keys


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (time, level, logger, message, exception), so a log pipeline parses every record of
    every `spo` process, uvicorn's included, without a pattern per source."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """One log format for every `spo` process, serving or training (SPO_LOG_LEVEL, SPO_LOG_FORMAT). uvicorn is run
    without a logging config of its own (log_config=None), so its records reach this handler too."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])

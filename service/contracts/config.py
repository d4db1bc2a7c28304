"""Service settings, read from `SPO_*` environment variables (pydantic-settings); CLI flags override them.

One `Settings` object is shared by the API, the worker and `spo serve`, so a deployment sets each knob once.
Lists (`SPO_MODELS`, `SPO_API_KEYS`) are comma-separated.
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

    # HTTP
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted request body")

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    def load_api_keys(self) -> list[str]:
        """Keys from SPO_API_KEYS plus the keys file; an empty list means auth is off."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
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

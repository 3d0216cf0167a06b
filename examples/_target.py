"""Where the examples' target LLM comes from: OpenAI or Anthropic when a key is set, else a local model.

Offline, the bundled SmolLM2 is served in this process over the OpenAI-compatible API of
``bpo serve``, so the examples use the same client classes either way.
"""

from __future__ import annotations

import os

LOCAL_MODEL = "smollm2-135m-instruct"


def provider() -> str:
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    return "local"


def local_base_url() -> str:
    """Serve the bundled model on 127.0.0.1 in a background thread; return its /v1 URL."""
    from bpo_plugins.backends import load_local_backend
    from bpo_plugins.server import serve_in_thread
    from bpo_plugins.server.local import build_app

    _, url = serve_in_thread(build_app(load_local_backend(LOCAL_MODEL)))  # type: ignore[arg-type]
    return url


def show(original: str, rewritten: str, fallback: object, answer: str) -> None:
    print(f"target:    {provider()}")
    print(f"original:  {original}")
    print(f"rewritten: {rewritten}" + (f"   [fallback: {fallback}]" if fallback else ""))
    print(f"answer:    {answer.strip()}")

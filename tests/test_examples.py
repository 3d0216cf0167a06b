"""Every example runs offline, as a user runs it, and shows original, rewrite and answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: What a newcomer must not read: a framework's field markers instead of an answer (DSPy's
#: ``[[ ## answer ## ]]``, as a 135M model mangles them), or a leak report at exit.
UNREADABLE = re.compile(r"\[\[? ?## ")


def _offline_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}


@pytest.mark.parametrize("name", ["langchain_chain.py", "langchain_agent.py", "llamaindex_rag.py", "dspy_program.py"])
def test_example_runs_offline(name, bundled_folder):
    run = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=_offline_env(),
                         cwd=EXAMPLES, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in run.stdout.splitlines() if ":" in line}
    assert lines["target"] == "local"
    assert lines["original"]
    assert lines["rewritten"]
    assert lines["answer"]
    assert not UNREADABLE.search(run.stdout), run.stdout
    assert "leaked" not in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_genai_model_is_released_at_exit(bundled_folder):
    """The bundled optimizer (GenAI runtime) still held at exit by a daemon thread, as the examples' target
    server holds its model: GenAI reports no leaked model or generator when the interpreter exits (it did,
    at the end of examples/langchain_chain.py)."""
    script = ("import threading, time\nfrom bpo_plugins import Rewriter\nr = Rewriter.shared()\n"
              "print(r.backend.name)\nprint(r.rewrite('Tell me about the Eiffel Tower').rewritten)\n"
              "held = threading.Thread(target=lambda rewriter: time.sleep(1000), args=(r,), daemon=True)\nheld.start()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_offline_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.split("\n", 1)[0] != "onnx-genai":
        pytest.skip("the default runtime here is not onnxruntime-genai")
    assert "OGA Error" not in run.stderr and "leaked" not in run.stderr, run.stderr[-3000:]

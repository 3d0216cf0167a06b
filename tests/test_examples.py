"""Every example runs offline, as a user runs it, and shows original, rewrite and answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["langchain_chain.py", "langchain_agent.py", "llamaindex_rag.py", "dspy_program.py"])
def test_example_runs_offline(name, bundled_folder):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    run = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=env, cwd=EXAMPLES, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in run.stdout.splitlines() if ":" in line}
    assert lines["target"] == "local"
    assert lines["original"]
    assert lines["rewritten"]
    assert lines["answer"]

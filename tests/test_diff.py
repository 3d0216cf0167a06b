"""The word diff the playground page and ``bpo optimize`` on a terminal both show."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpo_plugins.diff import DiffOp, rich_diff, word_diff

ANSI = re.compile(r"\x1b\[[0-9;]*m")
words = st.lists(st.sampled_from(["the", "a", "prompt", "Please", "tips", "interview.", "<b>", "\n", "  "]), max_size=12)


def test_word_diff_marks_whole_words():
    assert word_diff("Give me three tips for a job interview", "Please provide three tips for a job interview.") == [
        DiffOp("removed", "Give me "),
        DiffOp("added", "Please provide "),
        DiffOp("same", "three tips for a job "),
        DiffOp("removed", "interview"),
        DiffOp("added", "interview."),
    ]
    assert word_diff("same text", "same text") == [DiffOp("same", "same text")]
    assert word_diff("", "") == []


@given(words, words)
def test_word_diff_gives_back_both_sides(before_words, after_words):
    before, after = " ".join(before_words), " ".join(after_words)
    ops = word_diff(before, after)
    assert "".join(op.text for op in ops if op.tag != "added") == before
    assert "".join(op.text for op in ops if op.tag != "removed") == after
    assert all(a.tag != b.tag for a, b in zip(ops, ops[1:]))  # runs of one kind are merged


def test_rich_diff_never_reads_markup():
    text = rich_diff(word_diff("[bold]x[/bold]", "[red]y"))
    assert text.plain == "[bold]x[/bold][red]y"


def _optimize(prompt: str, *, terminal: bool) -> tuple[str, str]:
    """``bpo optimize PROMPT``: its stdout (a pseudo-terminal, or a pipe) and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(TERM="xterm-256color", COLUMNS="200")
    command = [sys.executable, "-m", "bpo_plugins.cli", "optimize", prompt]
    if not terminal:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout, run.stderr
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, text=True, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process is done writing
                break
            if not chunk:
                break
            chunks.append(chunk)
        stderr = process.stderr.read()
        assert process.wait(timeout=600) == 0, stderr[-2000:]
    finally:
        os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n"), stderr


@pytest.mark.slow
def test_optimize_on_a_terminal_shows_the_word_diff_in_colour_and_a_pipe_gets_plain_text(bundled_folder):
    prompt = "Give me three tips for a job interview"
    piped, _ = _optimize(prompt, terminal=False)
    rewritten = piped.removesuffix("\n")
    assert "\n" not in rewritten and not ANSI.search(piped)  # exactly the prompt to send on, as before
    shown, _ = _optimize(prompt, terminal=True)
    assert ANSI.search(shown), repr(shown)
    ops = word_diff(prompt, rewritten)
    assert any(op.tag != "same" for op in ops), rewritten
    assert ANSI.sub("", shown).rstrip("\n") == "".join(op.text for op in ops)


@pytest.mark.slow
def test_optimize_on_a_terminal_gives_the_fallback_reason(bundled_folder):
    shown, stderr = _optimize("Write a poem", terminal=True)
    assert ANSI.sub("", shown).strip() == "Write a poem"
    assert re.search(r"\[fallback: \w+\] \S", stderr), stderr

"""What users hand the package: row files (JSON, JSONL, gzip), export manifests, and the errors for bad ones.

Every bad input file fails with one line that names the file and, where there is one, the line::

    rows.jsonl:7: not valid JSON (Expecting ',' delimiter at column 12)
    rows.jsonl:3: not UTF-8 (byte 0xff at column 12)

The ``bpo`` command prints a :class:`UsageError` (an :class:`InputError` is one) as that line and
exits 2; any other exception is a bug and exits 1.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

__all__ = [
    "ENGINES",
    "MANIFEST",
    "PRECISIONS",
    "InputError",
    "Manifest",
    "UsageError",
    "PROMPT_FIELDS",
    "numbered_rows",
    "read_manifest",
    "read_prompt_rows",
    "read_rows",
    "read_text",
    "resume_jsonl",
    "row_prompt",
    "usage_errors",
]

#: What a row file may hold, said when a file is not one.
ROWS_EXPECTED = "expected JSON Lines (one JSON object per line) or a JSON array of objects"


class UsageError(ValueError):
    """Bad input from the user (a flag, a setting, a file): the ``bpo`` command prints it as one line and exits 2.

    A ``ValueError``, so library callers that catch ``ValueError`` for bad arguments still do.
    """


class InputError(UsageError):
    """A bad input file: the message starts with ``PATH:LINE:`` (``PATH:`` where no line applies)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


@contextmanager
def usage_errors() -> Iterator[None]:
    """Around a call that checks the user's settings (flags, a config file): its ``ValueError`` is a usage error.

    Only for such calls: elsewhere a ``ValueError`` is a bug, and the ``bpo`` command says so.
    """
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# -- text ----------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, not a file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(path, f"not a readable gzip file ({exc})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read it ({exc.strerror or exc})") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (gzipped when it ends in ``.gz``); a missing, unreadable or non-UTF-8 file raises
    :class:`InputError` naming the file, and for a bad byte its line and column."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(path, f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - start + 1})", line) from None


# -- rows ----------------------------------------------------------------------------------------


def resume_jsonl(path: str | Path) -> list[Any]:
    """The rows an interrupted run appended to a JSONL file, parsed; the file is cut after the last whole one.

    A run killed mid-write leaves a torn last line, and a row appended after it would be glued to the
    fragment and lost. Every writer that resumes (``bpo optimize --file``, self-play's rows, the
    evaluation and score caches) reads its file through this one rule: rows up to the first line that
    is not whole JSON ended by a newline are kept, the rest is cut, and the next append starts a line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    *lines, tail = read_text(path).split("\n")  # "\n" only: a row's text may hold U+2028 and other line breaks
    rows: list[Any] = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) != len(lines) or tail:
        path.write_text("".join(line + "\n" for line in lines[: len(rows)]), encoding="utf-8")
    return rows



def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> InputError:
    """``json``'s message without its own position, which the error's prefix now gives."""
    line = exc.lineno if line is None else line
    hint = f"; {ROWS_EXPECTED}" if line == 1 else ""
    return InputError(path, f"not valid JSON ({exc.msg} at column {exc.colno}){hint}", line)


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _array_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    index = skip(index)
    if index < len(text) and text[index] == "]":
        index += 1
    else:
        while True:
            try:
                row, end = decoder.raw_decode(text, index)
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc) from None
            line = _line_of(text, index)
            if not isinstance(row, dict):
                raise InputError(path, f"an array item that is not a JSON object (a {type(row).__name__})", line)
            yield line, row
            index = skip(end)
            if index < len(text) and text[index] == ",":
                index = skip(index + 1)
                continue
            if index < len(text) and text[index] == "]":
                index += 1
                break
            line = _line_of(text, index)
            raise InputError(path, "not valid JSON (expected ',' or ']' after an array item)", line)
    if skip(index) < len(text):
        raise InputError(path, "not valid JSON (extra data after the array)", _line_of(text, skip(index)))


def numbered_rows(path: str | Path) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """``(line, row)`` for each object of a JSON Lines file, a JSON array, a ``{"train": [...]}`` split
    (``line`` None there) or a single object; gzipped when the name ends in ``.gz``.

    Anything else raises :class:`InputError` naming the file and the line at fault.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped.startswith("["):
        yield from _array_rows(path, text)
        return
    lines = stripped.splitlines()
    first_line = _line_of(text, len(text) - len(stripped))
    try:
        json.loads(lines[0])
        jsonl = len([line for line in lines if line.strip()]) > 1
    except json.JSONDecodeError:
        jsonl = False
    if not jsonl:  # one JSON document (a one-line or pretty-printed object), or not JSON at all
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc) from None
        if not isinstance(data, dict):
            raise InputError(path, f"not a JSON object (a {type(data).__name__}); {ROWS_EXPECTED}", first_line)
        rows = next((v for k, v in data.items() if k in ("train", "data", "rows") and isinstance(v, list)), None)
        if rows is None:
            yield first_line, data
            return
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise InputError(path, f"item {number} of the rows is a {type(row).__name__}, expected a JSON object")
            yield None, row
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc, number) from None
        if not isinstance(row, dict):
            raise InputError(path, f"not a JSON object (a {type(row).__name__}); {ROWS_EXPECTED}", number)
        yield number, row


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON Lines file, a JSON array or a split (see :func:`numbered_rows`)."""
    for _, row in numbered_rows(path):
        yield row


#: Where a row's prompt may be, first match wins: BPO pairs, Dolly and Self-Instruct, Vicuna, other sets.
PROMPT_FIELDS = ("prompt", "instruction", "text", "question")


def row_prompt(row: dict[str, Any]) -> str | None:
    """The row's prompt: its first string field among :data:`PROMPT_FIELDS`, else None."""
    return next((row[f] for f in PROMPT_FIELDS if isinstance(row.get(f), str)), None)


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows that each have a prompt (see :data:`PROMPT_FIELDS`) and, optionally, a string ``context``:
    what ``bpo optimize --file`` and ``bpo bench`` read. A row without one names its line."""
    rows = []
    for number, (line, row) in enumerate(numbered_rows(path), 1):
        item = "" if line is not None else f"row {number}: "
        if row_prompt(row) is None:
            raise InputError(path, f"{item}no string 'prompt' field (nor {', '.join(PROMPT_FIELDS[1:])})", line)
        if row.get("context") is not None and not isinstance(row["context"], str):
            raise InputError(path, f"{item}'context' must be a string", line)
        rows.append(row)
    return rows


# -- export manifests ----------------------------------------------------------------------------

#: The file in every ``bpo export onnx`` folder that says what it holds.
MANIFEST = "bpo_export.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: ``optimum``: optimum-onnx's graph, run by ``transformers.generate``. ``genai``: onnxruntime-genai's model
#: builder (fused contrib ops), run by GenAI's C++ decode loop: 3-5x the decode speed on CPU
#: (benchmarks/RESULTS.md). ``auto`` picks genai when it is installed and the model is one it builds.
ENGINES = ("auto", "optimum", "genai")


@dataclass
class Manifest:
    """``bpo_export.json``: the source model, precision, template, parity figures and size of an export."""

    source: str
    precision: str
    device: str
    template: dict[str, Any]
    parity: dict[str, Any]
    size_mb: float
    onnx_file: str = "model.onnx"
    created: str = ""
    format_version: int = 1
    engine: str = "optimum"
    block_size: int | None = None  # quantization block, for int8/int4
    int4_algo: str | None = None  # the GenAI builder's int4 method (int4 GenAI exports only)

    def template_object(self) -> PromptTemplate:
        return PromptTemplate(**self.template)


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an export folder; :class:`ModelLoadError` says how to fix a missing or broken one."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(**raw)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{folder} is not a bpo export: {MANIFEST} is missing (create one with `bpo export onnx`)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ModelLoadError(f"{path} is corrupted: {exc}; export again with `bpo export onnx`") from exc
    if manifest.format_version != 1 or manifest.precision not in PRECISIONS or manifest.engine not in ENGINES[1:]:
        raise ModelLoadError(f"{path}: unsupported export (format {manifest.format_version}, precision {manifest.precision}, "
                             f"engine {manifest.engine})")
    if not (folder / manifest.onnx_file).is_file():
        raise ModelLoadError(f"{folder}: the manifest names {manifest.onnx_file}, which is missing; export again")
    return manifest

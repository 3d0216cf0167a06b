"""Finished work kept in memory and, with a path, in a JSONL file of ``{"key", "value"}`` rows, so an
interrupted run resumes without recomputing it: the evaluation's LLM calls and self-play's scores."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import resume_jsonl

__all__ = ["JsonlCache"]


class JsonlCache:
    """Values by key; a torn last line of the file is cut on opening (that value is computed again)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.values: dict[str, Any] = {row["key"]: row["value"] for row in resume_jsonl(self.path)} if self.path is not None else {}
        self._lock = threading.Lock()

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put_many(self, items: dict[str, Any]) -> None:
        with self._lock:
            self.values.update(items)
            if self.path is not None and items:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as sink:
                    sink.writelines(json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n" for k, v in items.items())

    def get_or_call(self, parts: Sequence[str], call: Callable[[], Any]) -> Any:
        """The value for ``parts``, calling ``call`` (and keeping its value) when there is none yet."""
        key = self.key(*parts)
        if key not in self.values:
            self.put_many({key: call()})
        return self.values[key]

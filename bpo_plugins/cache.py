"""Rewrite caches: an in-process LRU, optionally backed by a SQLite file shared across runs."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class RewriteCache:
    """Maps a cache key to a JSON-able rewrite record. Thread-safe."""

    def __init__(self, maxsize: int = 1024, path: str | Path | None = None) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self.path = None if path is None else Path(path).expanduser()
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS rewrites (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
            self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._memory.get(key)
            if record is not None:
                self._memory.move_to_end(key)
            elif self._db is not None:
                row = self._db.execute("SELECT record FROM rewrites WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    record = json.loads(row[0])
                    self._remember(key, record)
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
            return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._remember(key, record)
            if self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO rewrites (key, record) VALUES (?, ?)", (key, json.dumps(record))
                )
                self._db.commit()

    def _remember(self, key: str, record: dict[str, Any]) -> None:
        if self.maxsize == 0:
            return
        self._memory[key] = record
        self._memory.move_to_end(key)
        while len(self._memory) > self.maxsize:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

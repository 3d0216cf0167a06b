"""Rewrite caches: an in-process LRU, optionally backed by a SQLite file shared across runs, or by
Redis / Valkey shared by every worker and replica (:class:`RedisRewriteCache`)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from bpo_plugins.backends.base import Backend
    from bpo_plugins.decoding import Decoding
    from bpo_plugins.guards import GuardConfig
    from bpo_plugins.masking import Masked
    from bpo_plugins.templates import PromptTemplate

log = logging.getLogger("bpo_plugins.cache")


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def rewrite_key(backend: Backend, template: PromptTemplate, decoding: Decoding, guards: GuardConfig, masked: Masked) -> str:
    """What a cached rewrite is valid for: the model (and its revision), the template, the decoding,
    the guards that judged it, and the prompt as the optimizer saw it with its protected spans."""
    return cache_key(backend.name, backend.model_id, backend.revision, [template.user, template.system, template.raw],
                     decoding.as_key(), dataclasses.asdict(guards), masked.text, masked.spans)


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

    async def aget(self, key: str) -> dict[str, Any] | None:
        """:meth:`get` for the event loop (memory and a local SQLite file answer in microseconds)."""
        return self.get(key)

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


#: Seconds a Redis entry lives unless the URL says otherwise (``?ttl_s=``).
REDIS_TTL_S = 7 * 24 * 3600
#: Seconds a Redis call may take before it counts as a miss (``?timeout_ms=``): a local Redis answers in ~0.2 ms.
REDIS_TIMEOUT_S = 0.025
#: Seconds Redis is left alone after an error, so a dead server costs nothing per request.
REDIS_BACKOFF_S = 1.0


class RedisRewriteCache(RewriteCache):
    """The in-process LRU in front of Redis or Valkey: one greedy rewrite cache for every process.

    ``url``: ``redis://[:password@]HOST:PORT/DB`` (``rediss://`` for TLS), with optional ``ttl_s`` and
    ``timeout_ms`` query parameters. Entries are keyed as the SQLite cache's are (model, revision,
    template, decoding, guards, prompt: one SHA-256) under ``bpo:rewrite:``, expire after ``ttl_s``,
    and hold the rewrite record only: no key, no header.

    Redis never fails a rewrite: an error or a call slower than ``timeout_ms`` is a miss (reported to
    ``on_error(kind)``), and Redis is then skipped for a second.

    Async callers (the gateway) call :meth:`aget` first, on ``redis.asyncio``: the event loop never
    waits on a socket, and :meth:`get` then answers from memory. A :meth:`get` that no :meth:`aget`
    preceded (``Rewriter.rewrite`` in a thread, or ``arewrite`` called directly) reads Redis with the
    blocking client, bounded by the same timeout. Writes made on an event loop's thread go out as
    tasks on that loop; elsewhere through the blocking client.
    """

    PREFIX = "bpo:rewrite:"

    def __init__(self, url: str, maxsize: int = 1024, *, on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(maxsize)
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "valkey", "valkeys", "unix"):
            raise ValueError(f"cache_url must be a redis:// or rediss:// URL, got scheme {parts.scheme!r}")
        query = dict(parse_qsl(parts.query))
        try:
            self.ttl_s = int(query.pop("ttl_s", REDIS_TTL_S))
            self.timeout_s = float(query.pop("timeout_ms", REDIS_TIMEOUT_S * 1000)) / 1000
        except ValueError:
            raise ValueError("cache_url: ttl_s and timeout_ms must be numbers") from None
        if self.ttl_s <= 0 or self.timeout_s <= 0:
            raise ValueError("cache_url: ttl_s and timeout_ms must be > 0")
        scheme = {"valkey": "redis", "valkeys": "rediss"}.get(parts.scheme, parts.scheme)
        self._url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), ""))  # may hold a password: never logged
        self.on_error = on_error
        self._down_until = 0.0
        self._checked: OrderedDict[str, None] = OrderedDict()  # looked up by aget and missed
        self._sync: Any = None
        self._async: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    # -- clients ------------------------------------------------------------------------------

    def _sync_client(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis.from_url(self._url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                                              retry_on_timeout=False)
        return self._sync

    def _async_client(self, loop: asyncio.AbstractEventLoop) -> Any:
        # redis.asyncio's connections belong to the loop that opened them: one client per loop.
        if self._async is None or self._async[0] is not loop:
            import redis.asyncio

            self._async = (loop, redis.asyncio.Redis.from_url(self._url, socket_timeout=self.timeout_s,
                                                              socket_connect_timeout=self.timeout_s, retry_on_timeout=False))
        return self._async[1]

    def _down(self) -> bool:
        if time.monotonic() < self._down_until:
            self._failed("down")
            return True
        return False

    def _failed(self, kind: str, exc: BaseException | None = None) -> None:
        if kind != "down":
            self._down_until = time.monotonic() + REDIS_BACKOFF_S
            log.warning("the Redis rewrite cache failed (%s); a miss, Redis skipped for %.0f s",
                        type(exc).__name__ if exc else kind, REDIS_BACKOFF_S)
        if self.on_error is not None:
            self.on_error(kind)

    @staticmethod
    def _on_loop_thread() -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._memory.get(key)
            if record is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return record
            checked = key in self._checked
            self._checked.pop(key, None)
        if checked or self._down():
            record = None
        else:
            record = self._decode(self._blocking("get", key))
        with self._lock:
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
                self._remember(key, record)
        return record

    async def aget(self, key: str) -> dict[str, Any] | None:
        """Fill the memory tier from Redis without blocking the loop; :meth:`get` then answers at once."""
        with self._lock:
            record = self._memory.get(key)
        if record is not None or self._down():
            return record
        client = self._async_client(asyncio.get_running_loop())
        try:
            raw = await asyncio.wait_for(client.get(self.PREFIX + key), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raw = None
            self._failed("timeout", exc)
        except Exception as exc:  # noqa: BLE001 - redis errors, refused connections: a miss
            raw = None
            self._failed("error", exc)
        record = self._decode(raw)
        with self._lock:
            if record is None:
                self._checked[key] = None
                while len(self._checked) > 4096:
                    self._checked.popitem(last=False)
            else:
                self._remember(key, record)
        return record

    # -- writes -------------------------------------------------------------------------------

    def put(self, key: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._remember(key, record)
            self._checked.pop(key, None)
        if self._down():
            return
        payload = json.dumps(record, ensure_ascii=False)
        loop = self._on_loop_thread()
        if loop is None:
            self._blocking("set", key, payload)
            return
        task = loop.create_task(self._aset(loop, key, payload))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _aset(self, loop: asyncio.AbstractEventLoop, key: str, payload: str) -> None:
        try:
            await asyncio.wait_for(self._async_client(loop).set(self.PREFIX + key, payload, ex=self.ttl_s), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            self._failed("timeout", exc)
        except Exception as exc:  # noqa: BLE001
            self._failed("error", exc)

    def _blocking(self, op: str, key: str, payload: str | None = None) -> Any:
        import redis

        try:
            client = self._sync_client()
            if op == "get":
                return client.get(self.PREFIX + key)
            return client.set(self.PREFIX + key, payload, ex=self.ttl_s)
        except redis.exceptions.TimeoutError as exc:
            self._failed("timeout", exc)
        except Exception as exc:  # noqa: BLE001
            self._failed("error", exc)
        return None

    @staticmethod
    def _decode(raw: bytes | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def __repr__(self) -> str:
        return f"RedisRewriteCache(ttl_s={self.ttl_s}, timeout_s={self.timeout_s})"  # never the URL: it may hold a password


def make_cache(maxsize: int = 1024, path: str | Path | None = None, url: str | None = None) -> RewriteCache:
    """The rewrite cache a Rewriter's settings name: Redis (``url``), a SQLite file (``path``) or memory."""
    if url and path:
        raise ValueError("give a cache_path (SQLite, one host) or a cache_url (Redis, every host), not both")
    return RedisRewriteCache(url, maxsize) if url else RewriteCache(maxsize, path)

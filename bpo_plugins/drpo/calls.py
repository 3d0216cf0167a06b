"""Every LLM call of a DRPO run: cached, budgeted, retried, concurrent.

A :class:`Role` is a core backend doing one job (base model, metrics, judge, optimizer). The
:class:`Caller` sends a role's calls through the core's SQLite :class:`~bpo_plugins.cache.RewriteCache`
keyed by model, prompt and decoding, so a resumed or repeated run re-pays nothing. A :class:`Ledger`
counts calls, tokens and cost per role and stops the run when a cap is reached.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.backends.http import HTTPBackend
from bpo_plugins.cache import RewriteCache, cache_key
from bpo_plugins.decoding import Decoding, cut_at_stop
from bpo_plugins.templates import PromptTemplate

ROLES = ("base", "metrics", "judge", "optimizer")
#: Statuses worth another try: timeouts, conflicts, rate limits and server errors.
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CHARS_PER_TOKEN = 4  # a token estimate where a runtime reports no usage


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float = 0.0
    output: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Price:
        """``"2.5/10"``: input and output dollars per million tokens."""
        try:
            inp, _, out = text.partition("/")
            return cls(float(inp), float(out or inp))
        except ValueError:
            raise ValueError(f"a price is INPUT/OUTPUT dollars per million tokens, like 2.5/10, not {text!r}") from None


@dataclass(frozen=True)
class Caps:
    """Hard limits for one role (``None``: no limit). Cached calls are free and never count."""

    calls: int | None = None
    tokens: int | None = None
    cost_usd: float | None = None


@dataclass
class Role:
    name: str
    backend: Backend
    decoding: Decoding
    price: Price = Price()

    @property
    def model(self) -> str:
        return f"{self.backend.name}:{self.backend.model_id}@{self.backend.revision}"


def raw_capable(backend: Backend) -> bool:
    """Whether ``backend`` can take one raw text with no chat template: a local model, or an
    OpenAI-compatible server through ``/v1/completions`` (the OpenAI backend's raw-template path,
    as DRPO's search gives its local base models the whole text, ``world_model.py``)."""
    from bpo_plugins.backends.openai import OpenAIBackend

    return not isinstance(backend, HTTPBackend) or isinstance(backend, OpenAIBackend)


class BudgetExhausted(Exception):
    def __init__(self, role: str, what: str, limit: float) -> None:
        super().__init__(f"the {role} {what} cap ({limit:g}) was reached")
        self.role, self.what, self.limit = role, what, limit


class DRPOError(Exception):
    """A DRPO job that ran and could not go on (the command line exits 1)."""


class CallFailed(DRPOError):
    """A call that failed for good: a client error, or a transient one after every retry."""


@dataclass
class Usage:
    calls: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Ledger:
    """Calls, tokens and dollars per role, against per-role caps. Thread-safe."""

    caps: Mapping[str, Caps] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=lambda: {role: Usage() for role in ROLES})

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def reserve(self, role: str) -> None:
        """Count a live call about to be sent, or raise :class:`BudgetExhausted`."""
        caps, used = self.caps.get(role, Caps()), self.usage[role]
        with self._lock:
            if caps.calls is not None and used.calls >= caps.calls:
                raise BudgetExhausted(role, "calls", caps.calls)
            if caps.tokens is not None and used.tokens >= caps.tokens:
                raise BudgetExhausted(role, "tokens", caps.tokens)
            if caps.cost_usd is not None and used.cost_usd >= caps.cost_usd:
                raise BudgetExhausted(role, "cost", caps.cost_usd)
            used.calls += 1

    def record(self, role: Role, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            used = self.usage[role.name]
            used.input_tokens += input_tokens
            used.output_tokens += output_tokens
            used.cost_usd += (input_tokens * role.price.input + output_tokens * role.price.output) / 1e6

    def count(self, role: str, what: str) -> None:
        with self._lock:
            setattr(self.usage[role], what, getattr(self.usage[role], what) + 1)

    @property
    def cost_usd(self) -> float:
        return sum(u.cost_usd for u in self.usage.values())

    @property
    def live_calls(self) -> int:
        return sum(u.calls for u in self.usage.values())

    @property
    def cached_calls(self) -> int:
        return sum(u.cached for u in self.usage.values())

    def to_dict(self) -> dict[str, Any]:
        return {role: {**asdict(u), "cost_usd": round(u.cost_usd, 6)} for role, u in self.usage.items()}


def retry_delay(exc: BaseException, attempt: int, backoff_s: float) -> float | None:
    """Seconds to wait before retrying ``exc``, or None when it is not worth retrying."""
    status = getattr(exc, "status_code", None)
    transport = status is None and (isinstance(exc, (TimeoutError, ConnectionError)) or
                                    any(word in type(exc).__name__ for word in ("Connection", "Timeout", "Connect")))
    if status not in RETRY_STATUS and not transport:
        return None
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        retry_after = min(float(headers.get("retry-after", 0)), 60.0)
    except (TypeError, ValueError):
        retry_after = 0.0
    return max(retry_after, backoff_s * 2**attempt * random.uniform(0.5, 1.0))  # jitter spreads a burst of 429s


#: Concurrent calls per HTTP backend, and retries (with backoff) on 429, 5xx and timeouts.
CONCURRENCY = 8
RETRIES = 4


class Caller:
    """Sends role calls: from the cache when it has them, else live under a per-backend concurrency limit."""

    def __init__(self, cache: RewriteCache, ledger: Ledger, *, concurrency: int = CONCURRENCY, retries: int = RETRIES,
                 backoff_s: float = 1.0, timeout_s: float | None = 300.0) -> None:
        self.cache, self.ledger = cache, ledger
        self.concurrency, self.retries, self.backoff_s, self.timeout_s = concurrency, retries, backoff_s, timeout_s
        self._limits: dict[tuple[int, int], asyncio.Semaphore] = {}
        self._in_flight: dict[tuple[int, str], asyncio.Future[list[str]]] = {}

    def _limit(self, backend: Backend) -> asyncio.Semaphore:
        # HTTP servers batch concurrent requests themselves; a local model runs one call at a time.
        key = (id(asyncio.get_running_loop()), id(backend))
        if key not in self._limits:
            self._limits[key] = asyncio.Semaphore(self.concurrency if isinstance(backend, HTTPBackend) else 1)
        return self._limits[key]

    async def __call__(self, role: Role, user: str, *, system: str | None = None, raw: bool = False,
                       decoding: Decoding | None = None, attempt: int = 0, salt: int | None = None) -> list[str]:
        """The texts (``decoding.num_candidates`` of them) a role's model gives for one input.

        ``raw``: ``user`` is the whole model input, no chat template: a local model's raw render, or
        one ``/v1/completions`` request to an OpenAI-compatible server.
        ``attempt`` > 0 asks again after an unusable answer: a new cache key, sampled. ``salt`` tells
        apart sampled calls that should not share a cached answer (another run seed).
        """
        decoding = decoding or role.decoding
        if attempt:
            decoding = replace(decoding, do_sample=True, temperature=max(decoding.temperature, 0.7))
        backend = role.backend
        key = cache_key("drpo-call", backend.name, backend.model_id, backend.revision, system, user, raw, decoding.as_key(), attempt, salt)
        record = self.cache.get(key)
        if record is not None:
            self.ledger.count(role.name, "cached")
            return list(record["texts"])
        # The same call already on its way (two nodes with the same answer to judge): wait for it, pay once.
        flight = (id(asyncio.get_running_loop()), key)
        if flight in self._in_flight:
            self.ledger.count(role.name, "cached")
            return list(await asyncio.shield(self._in_flight[flight]))
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._in_flight[flight] = future
        try:
            texts = await self._send(role, key, user, system, raw, decoding)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a failure nobody else awaited is not logged as lost
            raise
        else:
            future.set_result(texts)
            return texts
        finally:
            del self._in_flight[flight]

    async def _send(self, role: Role, key: str, user: str, system: str | None, raw: bool, decoding: Decoding) -> list[str]:
        backend = role.backend
        if raw and not raw_capable(backend):
            raise ValueError(f"the raw prompt format needs a local {role.name} model or an OpenAI-compatible server; "
                             f"{backend.model_id!r} takes only chat messages")
        template = (PromptTemplate(name="drpo-raw", user="{prompt}", raw="{user}") if raw
                    else PromptTemplate(name=f"drpo-{role.name}", user="{prompt}", system=system))
        for retry in range(self.retries + 1):
            self.ledger.reserve(role.name)
            try:
                async with self._limit(backend):
                    output = await backend.agenerate([user], template, decoding, self.timeout_s)
                break
            except Exception as exc:
                delay = retry_delay(exc, retry, self.backoff_s) if retry < self.retries else None
                if delay is None:
                    self.ledger.count(role.name, "failed")
                    raise CallFailed(f"{role.name} call to {backend.model_id}: {type(exc).__name__}: {exc}") from exc
                self.ledger.count(role.name, "retries")
                await asyncio.sleep(delay)
        generation = output.generations[0]
        prompt_chars = len(user) + len(system or "")
        self.ledger.record(role, generation.input_tokens or -(-prompt_chars // CHARS_PER_TOKEN),
                           generation.output_tokens or -(-sum(map(len, generation.texts)) // CHARS_PER_TOKEN))
        # Backends stop at the stop strings; a server that ignores "stop" must not leak the rest.
        texts = [cut_at_stop(text, decoding.stop) for text in generation.texts]
        self.cache.put(key, {"texts": texts})
        return texts


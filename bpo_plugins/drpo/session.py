"""What every DRPO job shares: the four roles, the call cache and ledger, and the dynamic reward."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.cache import RewriteCache
from bpo_plugins.decoding import Decoding
from bpo_plugins.drpo.alignment import FORMATS, PromptFormat
from bpo_plugins.drpo.calls import ROLES, Caller, Caps, Ledger, Price, Role
from bpo_plugins.drpo.reward import AspectChoice, Judgement, choose_aspects, judge

log = logging.getLogger("bpo_plugins.drpo")


class Session:
    """Roles, a SQLite call cache, a budget ledger, and counted skips and warnings for one job."""

    def __init__(self, roles: Mapping[str, Role], cache_path: str | Path | None, *, caps: Mapping[str, Caps] | None = None,
                 known_aspects: Mapping[str, Any] | None = None, concurrency: int = 8, retries: int = 4,
                 backoff_s: float = 1.0) -> None:
        from bpo_plugins.drpo import metrics_cache

        missing = set(ROLES) - set(roles)
        if missing:
            raise ValueError(f"DRPO needs a model for every role; missing {sorted(missing)}")
        self.roles = dict(roles)
        self.caps = dict(caps or {})
        self.ledger = Ledger(self.caps)
        self.cache = RewriteCache(maxsize=4096, path=cache_path)
        self.call = Caller(self.cache, self.ledger, concurrency=concurrency, retries=retries, backoff_s=backoff_s)
        self.known_aspects = metrics_cache() if known_aspects is None else known_aspects
        self.skips: Counter[str] = Counter()
        self.warnings: list[str] = []
        self._aspects: dict[tuple[int, str], asyncio.Future[AspectChoice]] = {}
        base, judge_model = self.roles["base"].backend, self.roles["judge"].backend
        if (base.name, base.model_id, base.revision) == (judge_model.name, judge_model.model_id, judge_model.revision):
            self.warn(f"the judge is the base model itself ({base.model_id}): it tends to rate its own answers high")

    def warn(self, message: str) -> None:
        log.warning(message)
        if message not in self.warnings:
            self.warnings.append(message)

    def aspects(self, query: str) -> asyncio.Future[AspectChoice]:
        """One aspect choice per query, shared by every answer judged on it."""
        key = (id(asyncio.get_running_loop()), query)
        if key not in self._aspects:
            self._aspects[key] = asyncio.ensure_future(
                choose_aspects(self.call, self.roles["metrics"], query, self.known_aspects, self.skips))
        return self._aspects[key]

    async def rate(self, query: str, answer: str, *, harmful: bool = False) -> Judgement | None:
        """The judge's rating of ``answer`` on the query's aspects. ``harmful``: the query is known
        to be malicious (a seed from DRPO's malicious set), whatever the metrics LLM thought."""
        choice = await self.aspects(query)
        if harmful and not choice.harmful:
            choice = replace(choice, harmful=True)
        return await judge(self.call, self.roles["judge"], query, answer, choice, self.skips)

    def roles_described(self) -> dict[str, str]:
        return {r: role.model for r, role in self.roles.items()}

    async def aclose_clients(self) -> None:
        """Close the HTTP roles' connections before the job's event loop ends."""
        from bpo_plugins.backends.http import HTTPBackend

        backends = {id(r.backend): r.backend for r in self.roles.values() if isinstance(r.backend, HTTPBackend)}
        await asyncio.gather(*(b.aclose() for b in backends.values()), return_exceptions=True)

    def close(self) -> None:
        self.cache.close()


def default_roles(base: Backend, judge: Backend, optimizer: Backend, metrics: Backend | None = None, *,
                  prices: Mapping[str, Price] | None = None, answer_tokens: int = 512, num_actions: int = 3,
                  prompt_format: PromptFormat = FORMATS["chat"]) -> dict[str, Role]:
    """DRPO's decoding per role: the base model greedy (as its search ran) and stopping at ``<END>``;
    the optimizer sampling ``num_actions`` proposals in one call."""
    prices = prices or {}
    decodings = {
        "base": Decoding(max_new_tokens=answer_tokens, stop=prompt_format.stop),
        "metrics": Decoding(max_new_tokens=512),
        "judge": Decoding(max_new_tokens=768),
        "optimizer": Decoding(do_sample=True, temperature=0.9, num_candidates=num_actions, max_new_tokens=1024),
    }
    backends = {"base": base, "metrics": metrics or judge, "judge": judge, "optimizer": optimizer}
    return {r: Role(r, backends[r], decodings[r], prices.get(r, Price())) for r in ROLES}

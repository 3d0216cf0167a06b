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
from bpo_plugins.drpo.calls import CONCURRENCY, RETRIES, ROLES, Caller, Caps, Ledger, Price, Role
from bpo_plugins.drpo.formats import FORMATS, PromptFormat
from bpo_plugins.drpo.reward import AspectChoice, Judgement, choose_aspects, judge
from bpo_plugins.drpo.rubrics import SEARCH_RUBRIC, Rubric

log = logging.getLogger("bpo_plugins.drpo")


class Session:
    """Roles, a SQLite call cache, a budget ledger, and counted skips and warnings for one job.

    ``rubric``: the search's impartial judge or the example optimizer's critic. ``lenient`` and
    ``refusal_correction`` switch two of our guards (see docs/faithfulness.md). ``known_aspects``
    defaults to DRPO's published metrics cache for the search rubric and to none for the critic
    (DRPO's critic chose its own aspects)."""

    def __init__(self, roles: Mapping[str, Role], cache_path: str | Path | None, *, caps: Mapping[str, Caps] | None = None,
                 known_aspects: Mapping[str, Any] | None = None, concurrency: int = CONCURRENCY, retries: int = RETRIES,
                 backoff_s: float = 1.0, rubric: Rubric = SEARCH_RUBRIC, lenient: bool = True,
                 refusal_correction: bool = True) -> None:
        from bpo_plugins.drpo.presets import metrics_cache

        missing = set(ROLES) - set(roles)
        if missing:
            raise ValueError(f"DRPO needs a model for every role; missing {sorted(missing)}")
        self.roles = dict(roles)
        self.caps = dict(caps or {})
        self.ledger = Ledger(self.caps)
        self.cache = RewriteCache(maxsize=4096, path=cache_path)
        self.call = Caller(self.cache, self.ledger, concurrency=concurrency, retries=retries, backoff_s=backoff_s)
        self.rubric, self.lenient, self.refusal_correction = rubric, lenient, refusal_correction
        if known_aspects is None:
            known_aspects = metrics_cache() if rubric is SEARCH_RUBRIC else {}
        self.known_aspects = known_aspects
        self.skips: Counter[str] = Counter()
        self.warnings: list[str] = []
        self._aspects: dict[tuple[int, str], asyncio.Future[AspectChoice | None]] = {}
        base, judge_model = self.roles["base"].backend, self.roles["judge"].backend
        if (base.name, base.model_id, base.revision) == (judge_model.name, judge_model.model_id, judge_model.revision):
            self.warn(f"the judge is the base model itself ({base.model_id}): it tends to rate its own answers high")

    def warn(self, message: str) -> None:
        log.warning(message)
        if message not in self.warnings:
            self.warnings.append(message)

    def aspects(self, query: str) -> asyncio.Future[AspectChoice | None]:
        """One aspect choice per query, shared by every answer judged on it."""
        key = (id(asyncio.get_running_loop()), query)
        if key not in self._aspects:
            self._aspects[key] = asyncio.ensure_future(
                choose_aspects(self.call, self.roles["metrics"], query, self.known_aspects, self.skips,
                               rubric=self.rubric, lenient=self.lenient))
        return self._aspects[key]

    async def rate(self, query: str, answer: str, *, harmful: bool = False) -> Judgement | None:
        """The judge's rating of ``answer`` on the query's aspects. ``harmful``: the query is known
        to be malicious (a seed from DRPO's malicious set), whatever the metrics LLM thought. None
        (counted) when no rating came back, or, with strict parsing, no aspect choice could be read."""
        choice = await self.aspects(query)
        if choice is None:
            self.skips["aspects_unparsed_skipped"] += 1
            return None
        if harmful and not choice.harmful:
            choice = replace(choice, harmful=True)
        return await judge(self.call, self.roles["judge"], query, answer, choice, self.skips, rubric=self.rubric,
                           lenient=self.lenient, refusal_correction=self.refusal_correction)

    def guards(self) -> dict[str, bool]:
        """Which of our guards were on (the report and the artifact's provenance list them)."""
        return {"lenient_parsing": self.lenient, "refusal_correction": self.refusal_correction}

    def roles_described(self) -> dict[str, str]:
        return {r: role.model for r, role in self.roles.items()}

    async def aclose_clients(self) -> None:
        """Close the HTTP roles' connections before the job's event loop ends."""
        from bpo_plugins.backends.http import HTTPBackend

        backends = {id(r.backend): r.backend for r in self.roles.values() if isinstance(r.backend, HTTPBackend)}
        await asyncio.gather(*(b.aclose() for b in backends.values()), return_exceptions=True)

    def close(self) -> None:
        self.cache.close()


#: DRPO's answer length during its search and example optimization (``world_model.py``).
ANSWER_TOKENS = 2048
#: The ``seed`` DRPO's OpenAI client sends on every call (``reasoner/models/openai_model.py``).
REQUEST_SEED = 0


def default_roles(base: Backend, judge: Backend, optimizer: Backend, metrics: Backend | None = None, *,
                  prices: Mapping[str, Price] | None = None, answer_tokens: int = ANSWER_TOKENS, num_actions: int = 3,
                  prompt_format: PromptFormat = FORMATS["chat"], request_seed: int | None = REQUEST_SEED) -> dict[str, Role]:
    """DRPO's search decoding per role (``world_model.py``, ``search_config.py``, ``prompt_train.sh``):
    the base model greedy (T 0, top_p 1) up to 2,048 tokens, stopping at ``<END>``; the metrics and
    judge LLMs greedy up to 2,048; the optimizer sampling ``num_actions`` proposals in one call at
    T 0.2, top_p 0.95, up to 2,048 tokens (a backend without ``n`` sends that many calls). Every
    role's OpenAI requests carry ``seed`` = ``request_seed`` (DRPO: 0; None sends none)."""
    decodings = {
        "base": Decoding(max_new_tokens=answer_tokens, stop=prompt_format.stop),
        "metrics": Decoding(max_new_tokens=2048),
        "judge": Decoding(max_new_tokens=2048),
        "optimizer": Decoding(do_sample=True, temperature=0.2, top_p=0.95, num_candidates=num_actions, max_new_tokens=2048),
    }
    return _roles(base, judge, optimizer, metrics, decodings, prices, request_seed)


def icl_roles(base: Backend, judge: Backend, optimizer: Backend, metrics: Backend | None = None, *,
              prices: Mapping[str, Price] | None = None, answer_tokens: int = ANSWER_TOKENS,
              request_seed: int | None = REQUEST_SEED) -> dict[str, Role]:
    """DRPO's example-optimization decoding (``offline_icl_opti.py``): every role greedy (T 0, top_p 1)
    up to 2,048 tokens; the optimizer writes one rewrite per round; OpenAI requests carry ``seed``."""
    decodings = {
        "base": Decoding(max_new_tokens=answer_tokens, stop=FORMATS["chat"].stop),
        "metrics": Decoding(max_new_tokens=2048),
        "judge": Decoding(max_new_tokens=2048),
        "optimizer": Decoding(max_new_tokens=2048),
    }
    return _roles(base, judge, optimizer, metrics, decodings, prices, request_seed)


def _roles(base: Backend, judge: Backend, optimizer: Backend, metrics: Backend | None, decodings: Mapping[str, Decoding],
           prices: Mapping[str, Price] | None, request_seed: int | None) -> dict[str, Role]:
    prices = prices or {}
    decodings = {r: replace(d, seed=request_seed) for r, d in decodings.items()}
    backends = {"base": base, "metrics": metrics or judge, "judge": judge, "optimizer": optimizer}
    return {r: Role(r, backends[r], decodings[r], prices.get(r, Price())) for r in ROLES}

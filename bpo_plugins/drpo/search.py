"""DRPO's system-prompt search: a beam search scored by dynamic rewards, resumable and capped.

From the root prompt, level i answers seed query i with each beam prompt plus k retrieved
examples, and the judge rates the answer on the query's aspects. A prompt rated perfect (or above
the carry threshold) goes on unchanged and the search is extended by a level; otherwise the
optimizer proposes new prompts from the prompt, query, answer, rating and the prompt's lineage.
Children are ranked by the mean reward along their path. The top candidates and the root are then
re-scored on held-out seeds, and the winner is what they say, not the last beam.

Every level is checkpointed (beam, RNG state, history, spend); every call is cached. A run killed
mid-level resumes from the last level and re-pays no call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.alignment import Alignment, ExampleRetriever
from bpo_plugins.drpo.calls import (
    CONCURRENCY,
    RETRIES,
    BudgetExhausted,
    CallFailed,
    Caps,
    DRPOError,
    Role,
    Usage,
    raw_capable,
)
from bpo_plugins.drpo.checkpoint import Checkpoint, LevelRecord, Node, read_checkpoint, write_checkpoint
from bpo_plugins.drpo.formats import FORMATS, Example, strip_markers
from bpo_plugins.drpo.plan import cost_plan
from bpo_plugins.drpo.proposals import optimizer_input, read_proposal
from bpo_plugins.drpo.reward import Judgement
from bpo_plugins.drpo.search_config import INITIAL_PROMPT, SearchConfig
from bpo_plugins.drpo.seeds import Seed, drpo_order, drpo_seeds
from bpo_plugins.drpo.session import Session, log
from bpo_plugins.embeddings import MINILM

#: The settings and formats were defined here once: their old import path stays.
__all__ = ["FORMATS", "INITIAL_PROMPT", "Checkpoint", "Search", "SearchConfig", "SearchResult", "Seed", "drpo_order", "drpo_seeds"]

# -- the result ----------------------------------------------------------------------------------


@dataclass
class SearchResult:
    alignment: Alignment
    report: dict[str, Any]
    #: None when the search ran to the end; else why it stopped early (a cap, a failure).
    stopped: str | None = None


class Search:
    """One DRPO search, writing ``checkpoint.json``, ``calls.sqlite``, the artifact and the report to ``out``.

    With ``dry_run`` it is built only to :meth:`plan`: nothing is created on disk.
    """

    def __init__(
        self, roles: Mapping[str, Role], out: str | Path, *, config: SearchConfig = SearchConfig(),
        examples: Sequence[Example] | None = None, seeds: Sequence[Seed] | None = None,
        caps: Mapping[str, Caps] | None = None, known_aspects: Mapping[str, Any] | None = None,
        cache_path: str | Path | None = None, concurrency: int = CONCURRENCY, retries: int = RETRIES, backoff_s: float = 1.0,
        progress: bool = True, embedder: Any = None, dry_run: bool = False,
    ) -> None:
        from bpo_plugins.drpo.presets import icl_examples

        self.config, self.out = config, Path(out)
        self.examples = list(icl_examples() if examples is None else examples)
        ordered = drpo_order(drpo_seeds() if seeds is None else seeds, config.seed)
        held = config.holdout if config.final_check else 0
        if len(ordered) < 2 + held:
            raise ValueError(f"{len(ordered)} seed queries are too few: the search needs 2 and the final check {held}")
        self.holdout = ordered[len(ordered) - held:] if held else []
        # A path holds at most depth + max_extensions states (the root's included); state i answers query i.
        self.queries = ordered[: len(ordered) - held][: config.depth + config.max_extensions]
        if config.prompt_format.raw and not raw_capable(roles["base"].backend):
            raise ValueError(f"the {config.format} prompt format needs a local base model or an OpenAI-compatible server "
                             "(/v1/completions); use the chat format")
        # The call cache's SQLite file creates ``out``; a dry run keeps calls in memory (it makes none).
        self.session = Session(roles, None if dry_run else cache_path or self.out / "calls.sqlite", caps=caps, known_aspects=known_aspects,
                               concurrency=concurrency, retries=retries, backoff_s=backoff_s, lenient=config.lenient_parsing,
                               refusal_correction=config.refusal_correction)
        self.roles, self.ledger, self.call, self.skips = self.session.roles, self.session.ledger, self.session.call, self.session.skips
        self.retriever = ExampleRetriever(self.examples, embedder)
        self.progress = progress
        self.last_failure: str | None = None  # the latest call that failed for good, for the error a user sees

    # -- identity and checkpoint ----------------------------------------------------------------

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: settings, models, examples and seeds."""
        parts = {"config": asdict(self.config), "roles": {r: (role.model, role.decoding.as_key()) for r, role in self.roles.items()},
                 "examples": [asdict(e) for e in self.examples], "queries": [s.query for s in self.queries],
                 "holdout": [s.query for s in self.holdout]}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.json"

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint in ``out``, or None (:func:`~bpo_plugins.drpo.checkpoint.read_checkpoint`)."""
        return read_checkpoint(self.checkpoint_path, self.fingerprint())

    def save_checkpoint(self, state: Checkpoint) -> None:
        write_checkpoint(self.checkpoint_path, state)

    # -- one evaluation -------------------------------------------------------------------------

    async def answer(self, prompt: str, query: str) -> str:
        fmt = self.config.prompt_format
        system = fmt.render_system(prompt, self.retriever.top(query, self.config.k))
        if fmt.raw:
            texts = await self.call(self.roles["base"], fmt.render_raw(system, query), raw=True)
        else:
            texts = await self.call(self.roles["base"], fmt.render_user(query), system=system)
        return strip_markers(texts[0], fmt)

    async def evaluate(self, prompt: str, seed: Seed) -> tuple[str, Judgement] | None:
        """The base model's answer with ``prompt`` and its rating; None (counted) when either failed."""
        try:
            answer, _ = await asyncio.gather(self.answer(prompt, seed.query), self.session.aspects(seed.query))
            judgement = await self.session.rate(seed.query, answer, harmful=seed.source == "malicious")
        except CallFailed as exc:
            self.skips[f"call_failed:{str(exc).split(' ', 1)[0]}"] += 1
            self.last_failure = str(exc)
            log.info("evaluation skipped: %s", exc)
            return None
        return None if judgement is None else (answer, judgement)

    async def propose(self, node: Node, salt: int) -> list[str]:
        role = self.roles["optimizer"]
        text = optimizer_input(node, self.config.lineage)
        decoding = replace(role.decoding, num_candidates=self.config.num_actions)
        lenient = self.config.lenient_parsing
        for attempt in range(2 if lenient else 1):
            try:
                texts = await self.call(role, text, decoding=decoding, attempt=attempt, salt=salt)
            except CallFailed as exc:
                self.skips["call_failed:optimizer"] += 1
                log.info("proposal skipped: %s", exc)
                return []
            # As DRPO, every readable proposal is evaluated: one equal to the current prompt, or to
            # another proposal, too (the repeat's calls come from the cache; the beam keeps one copy).
            proposals: list[str] = []
            cap = self.config.max_prompt_chars
            for raw in texts:
                proposal = read_proposal(raw, lenient=lenient)
                if proposal is None:
                    self.skips["proposal_unparsed"] += 1
                elif cap is not None and len(proposal) > cap:
                    self.skips["proposal_too_long"] += 1
                else:
                    proposals.append(proposal)
            if proposals:
                return proposals[: self.config.num_actions]
        return []

    async def expand(self, node: Node, seed: Seed, salt: int) -> tuple[list[Node], bool, bool]:
        """A node's children on the next query; whether it needed no edit (DRPO's carry forward,
        which may extend the depth); whether it needed one and got no usable proposal."""
        carried = not node.needs_edit(self.config.carry_threshold)
        prompts = [node.prompt] if carried else await self.propose(node, salt)
        unedited = not prompts
        if unedited:  # the optimizer gave nothing usable: the prompt goes on as it is, with no extension
            self.skips["proposal_none_prompt_kept"] += 1
            prompts = [node.prompt]
        lineage = [*node.lineage, node.prompt]
        results = await asyncio.gather(*(self.evaluate(p, seed) for p in prompts))
        children = [Node(p, [*node.rewards, j.reward], lineage, seed.query, a, j, carried or unedited)
                    for p, r in zip(prompts, results) if r is not None for a, j in [r]]
        return children, carried, unedited

    # -- the search -----------------------------------------------------------------------------

    def run(self, *, fresh: bool = False, on_level: Callable[[Checkpoint], None] | None = None) -> SearchResult:
        if fresh:
            self.checkpoint_path.unlink(missing_ok=True)

        async def run() -> SearchResult:
            try:
                return await self._run(on_level)
            finally:
                await self.session.aclose_clients()

        return asyncio.run(run())

    async def _run(self, on_level: Callable[[Checkpoint], None] | None) -> SearchResult:
        from tqdm import tqdm

        state = self.load_checkpoint()
        resumed_from = None if state is None else state.level
        stopped: str | None = None
        if state is not None:
            self.ledger.usage.update({role: replace(used) for role, used in state.usage.items()})  # caps hold across restarts
            self.skips.update(state.skips)
        bar = tqdm(total=self.config.depth - 1, desc="drpo search", unit="level", disable=not self.progress)
        try:
            if state is None:
                state = await self._root()
                self.save_checkpoint(state)
            bar.total = state.depth_limit - 1
            bar.update(state.level)
            # DRPO's is_terminal: a path stops once it holds depth_limit states, the root's included.
            while state.level + 1 < state.depth_limit and state.level + 1 < len(self.queries):
                state = await self._level(state)
                self.save_checkpoint(state)
                bar.total = state.depth_limit - 1
                bar.set_postfix(best=f"{state.history[-1].best_path_mean:.2f}", calls=self.ledger.live_calls,
                                cached=self.ledger.cached_calls, cost=f"${self.ledger.cost_usd:.3f}")
                bar.update(1)
                if on_level:
                    on_level(state)
        except BudgetExhausted as exc:
            stopped = f"budget: {exc}"
        except _NoChild as exc:
            stopped = str(exc)
        finally:
            bar.close()
        if state is None:
            raise DRPOError(f"the search could not start: {stopped}")
        final = None
        if stopped is None and self.holdout:
            try:
                final = await self._final_check(state.beam, state.best_seen)
            except BudgetExhausted as exc:
                stopped = f"budget during the final check: {exc}"
            except _NoChild as exc:
                stopped = str(exc)
        if stopped:
            self.session.warn(f"search stopped early ({stopped}); returning the best prompt so far")
        winner = final["winner"] if final else max(state.beam, key=lambda n: n.path_mean).prompt
        return self._finish(state, winner, final, stopped, resumed_from)

    def _usage(self) -> dict[str, Usage]:
        return {role: replace(used) for role, used in self.ledger.usage.items()}

    async def _root(self) -> Checkpoint:
        seed = self.queries[0]
        result = await self.evaluate(self.config.initial_prompt, seed)
        if result is None:
            why = self.last_failure or dict(self.skips)
            raise DRPOError(f"the initial prompt could not be evaluated ({why}): check the base and judge models")
        # DRPO's beam starts from the root with no reward: its reward is in no path's mean.
        root = Node(self.config.initial_prompt, [], [], seed.query, result[0], result[1])
        rng = random.Random(self.config.seed)
        return Checkpoint(
            fingerprint=self.fingerprint(), level=0, extensions=0, depth_limit=self.config.depth, beam=[root], best_seen=[],
            rng=rng.getstate(), usage=self._usage(), skips=dict(self.skips), history=[self._history(0, seed, [root], [root], carried=0)],
        )

    async def _level(self, state: Checkpoint) -> Checkpoint:
        level = state.level + 1
        seed = self.queries[level]
        # The sampled proposals' cache salt comes from the checkpointed RNG: a run with another seed
        # samples anew, and a resumed run draws the same salt, so it finds its calls in the cache.
        rng = random.Random()
        rng.setstate(state.rng)
        salt = rng.getrandbits(32)
        expanded = await asyncio.gather(*(self.expand(node, seed, salt) for node in state.beam))
        children = [child for kids, _, _ in expanded for child in kids]
        if not children:
            raise _NoChild(f"level {level}: no child could be answered and judged ({dict(self.skips)})")
        carried = sum(was_carried for _, was_carried, _ in expanded)
        unedited = sum(failed for _, _, failed in expanded)
        new_beam = _top(children, self.config.beam_width)
        extensions, depth_limit = state.extensions, state.depth_limit
        if carried and extensions < self.config.max_extensions:
            extensions, depth_limit = extensions + 1, depth_limit + 1
        return replace(
            state, level=level, extensions=extensions, depth_limit=depth_limit, beam=new_beam,
            best_seen=_top([*state.best_seen, *children], self.config.top_candidates), rng=rng.getstate(),
            usage=self._usage(), skips=dict(self.skips),
            history=[*state.history, self._history(level, seed, children, new_beam, carried, unedited)],
        )

    def _history(self, level: int, seed: Seed, children: list[Node], beam: list[Node], carried: int, unedited: int = 0) -> LevelRecord:
        best = beam[0]
        return LevelRecord(
            level=level, query=seed.query, source=seed.source, children=len(children), carried=carried,
            rewards=[round(c.judgement.reward, 3) for c in children], best_reward=round(max(c.judgement.reward for c in children), 3),
            best_path_mean=round(best.path_mean, 4) if best.rewards else None, best_prompt=best.prompt,
            live_calls=self.ledger.live_calls, cost_usd=round(self.ledger.cost_usd, 6), unedited=unedited,
        )

    async def _final_check(self, beam: list[Node], seen: list[Node]) -> dict[str, Any]:
        """Re-score the top candidates and the initial prompt on held-out seeds; the best mean wins."""
        prompts = list(dict.fromkeys([n.prompt for n in _top([*beam, *seen], self.config.top_candidates)] + [self.config.initial_prompt]))
        grid = await asyncio.gather(*(self.evaluate(p, s) for p in prompts for s in self.holdout))
        rows = []
        for i, prompt in enumerate(prompts):
            rewards = [r[1].reward for r in grid[i * len(self.holdout):(i + 1) * len(self.holdout)] if r is not None]
            rows.append({"prompt": prompt, "initial": prompt == self.config.initial_prompt, "n": len(rewards),
                         "held_out_mean": round(sum(rewards) / len(rewards), 4) if rewards else None})
        scored = [r for r in rows if r["held_out_mean"] is not None]
        if not scored:
            raise _NoChild("the final check could not score any candidate")
        best = max(scored, key=lambda r: r["held_out_mean"])  # ties: the search's own ranking, first
        initial = next((r for r in rows if r["initial"]), None)
        beats = bool(initial and initial["held_out_mean"] is not None and not best["initial"]
                     and best["held_out_mean"] > initial["held_out_mean"])
        return {"candidates": rows, "winner": best["prompt"], "winner_mean": best["held_out_mean"],
                "initial_mean": initial and initial["held_out_mean"], "beats_initial": beats,
                "holdout_queries": [s.query for s in self.holdout]}

    def _finish(self, state: Checkpoint, winner: str, final: dict[str, Any] | None, stopped: str | None,
                resumed_from: int | None) -> SearchResult:
        from bpo_plugins.drpo.report import write_report

        roles = self.session.roles_described()
        history = [h.to_dict() for h in state.history]
        provenance = {
            "method": "DRPO beam search", "base_model": roles["base"], "judge": roles["judge"], "optimizer": roles["optimizer"],
            "metrics": roles["metrics"], "search": asdict(self.config), "guards": self.config.guards(),
            "root_reward": state.history[0].best_reward, "levels": [h.best_path_mean for h in state.history[1:]],
            "held_out": final and {k: final[k] for k in ("winner_mean", "initial_mean", "beats_initial")},
            "calls": self.ledger.live_calls, "cached_calls": self.ledger.cached_calls,
            "tokens": sum(u.tokens for u in self.ledger.usage.values()), "cost_usd": round(self.ledger.cost_usd, 6),
            "stopped": stopped,
        }
        alignment = Alignment(winner, tuple(self.examples), k=self.config.serve_k, format=self.config.prompt_format,
                              embedder=getattr(self.retriever.embedder, "name", MINILM), provenance=provenance)
        alignment.save(self.out / "alignment.json")
        report = {
            "fingerprint": self.fingerprint(), "config": asdict(self.config), "roles": roles,
            "caps": {r: asdict(c) for r, c in self.session.caps.items()}, "guards": self.config.guards(),
            "root_reward": state.history[0].best_reward, "levels": history,
            "final_check": final, "usage": self.ledger.to_dict(), "skips": dict(self.skips), "warnings": self.session.warnings,
            "stopped": stopped, "resumed_from_level": resumed_from, "winner": winner,
            "cache": {"live_calls": self.ledger.live_calls, "cached_calls": self.ledger.cached_calls},
        }
        write_report(report, self.out)
        self.session.close()
        return SearchResult(alignment, report, stopped)

    def plan(self) -> dict[str, dict[str, float]]:
        """Upper bounds on calls and tokens per role, before any call (:func:`~bpo_plugins.drpo.plan.cost_plan`)."""
        return cost_plan(self)


class _NoChild(DRPOError):
    """A level where nothing could be answered and judged: the search stops with what it has."""


def _top(nodes: Sequence[Node], n: int) -> list[Node]:
    """The n best distinct prompts by path mean; ties keep the earlier node (a stable order)."""
    best: dict[str, Node] = {}
    for node in sorted(nodes, key=lambda x: -x.path_mean):
        best.setdefault(node.prompt, node)
    return list(best.values())[:n]



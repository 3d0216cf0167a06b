"""DRPO's in-context example optimization: answer, judge, rewrite from the judge's feedback, repeat.

For each seed query the base model answers, the judge rates the answer on the query's aspects,
and for up to ``rounds`` rounds the optimizer rewrites the answer from that rating and the new
answer is rated again. The best-rated version is kept; a query stops early once every aspect is 5.
The result is an example bank for :class:`~bpo_plugins.drpo.Alignment` and the search.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.alignment import CHAT_FORMAT, Example, strip_markers
from bpo_plugins.drpo.calls import BudgetExhausted, CallFailed
from bpo_plugins.drpo.reward import Judgement, sections
from bpo_plugins.drpo.search import INITIAL_PROMPT, Seed
from bpo_plugins.drpo.session import Session

REWRITE_PROMPT = """An expert rated an AI assistant's answer to a user query. Rewrite the answer so that it would earn a 5 on every aspect of the rating: keep what is right, fix what the rating criticises, and add nothing the query does not need.

When the query asks for something harmful, the best answer declines clearly, says why, and offers a safe alternative.

{inputs}

Reply with the new answer only: no preface, no notes, no quotation marks."""


async def optimize_example(session: Session, seed: Seed, *, rounds: int = 5, system_prompt: str = INITIAL_PROMPT) -> dict[str, Any] | None:
    """One query's best answer and its history; None (counted in the session's skips) if none could be rated."""
    harmful = seed.source == "malicious"
    base_texts = await session.call(session.roles["base"], CHAT_FORMAT.render_user(seed.query), system=system_prompt)
    answer = strip_markers(base_texts[0])
    judgement = await session.rate(seed.query, answer, harmful=harmful)
    if judgement is None:
        return None
    best: tuple[str, Judgement] = (answer, judgement)
    history = [judgement.reward]
    for _ in range(rounds):
        if best[1].perfect:
            break
        optimizer = session.roles["optimizer"]
        prompt = REWRITE_PROMPT.format(inputs=sections(query=seed.query, answer=best[0], rating=best[1].feedback()))
        rewritten = await session.call(optimizer, prompt, decoding=replace(optimizer.decoding, num_candidates=1))
        candidate = strip_markers(rewritten[0])
        rated = await session.rate(seed.query, candidate, harmful=harmful)
        if rated is None:
            continue
        history.append(rated.reward)
        if rated.reward > best[1].reward:
            best = (candidate, rated)
    return {"query": seed.query, "answer": best[0], "reward": round(best[1].reward, 4), "scores": best[1].scores,
            "rounds": len(history) - 1, "history": [round(r, 4) for r in history]}


def optimize_examples(session: Session, seeds: Sequence[Seed], out: str | Path, *, rounds: int = 5,
                      system_prompt: str = INITIAL_PROMPT, progress: bool = True) -> dict[str, Any]:
    """Optimize every seed query's answer; ``out`` (JSON) gets the bank, ``out``.report.json the figures.

    Calls are cached in the session, so a killed run, started again, re-pays nothing."""
    from tqdm import tqdm

    stopped: list[str] = []

    async def run() -> list[dict[str, Any] | None]:
        with tqdm(total=len(seeds), desc="drpo icl", unit="query", disable=not progress) as bar:
            async def one(seed: Seed) -> dict[str, Any] | None:
                try:
                    return await optimize_example(session, seed, rounds=rounds, system_prompt=system_prompt)
                except CallFailed as exc:
                    session.skips["call_failed"] += 1
                    session.warn(f"example skipped: {exc}")
                except BudgetExhausted as exc:  # the examples already finished are kept
                    stopped.append(f"budget: {exc}")
                finally:
                    bar.update(1)
                    bar.set_postfix(calls=session.ledger.live_calls, cost=f"${session.ledger.cost_usd:.3f}")
                return None

            try:
                return await asyncio.gather(*(one(s) for s in seeds))
            finally:
                await session.aclose_clients()

    rows = [r for r in asyncio.run(run()) if r is not None]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank = {"bpo_plugins_artifact": "drpo-examples", "examples": [{"query": r["query"], "answer": r["answer"]} for r in rows]}
    out.write_text(json.dumps(bank, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report = {"examples": rows, "n": len(rows), "of": len(seeds), "stopped": stopped[0] if stopped else None, "roles": session.roles_described(),
              "usage": session.ledger.to_dict(), "skips": dict(session.skips), "warnings": session.warnings,
              "mean_reward_first": _mean([r["history"][0] for r in rows]), "mean_reward_best": _mean([r["reward"] for r in rows])}
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def read_examples(path: str | Path) -> list[Example]:
    """An example bank: ours (``{"examples": [{query, answer}]}``) or DRPO's ``ICL_examples.json`` (query -> answer)."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        rows = data["examples"]
    elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        rows = [{"query": q, "answer": a} for q, a in data.items()]
    else:
        raise ValueError(f"{path}: not an example bank (a {{'examples': [...]}} object or DRPO's query -> answer map)")
    try:
        return [Example.from_marked(str(r["query"]), str(r["answer"])) for r in rows]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: every example needs a 'query' and an 'answer'") from None

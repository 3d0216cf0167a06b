"""Raw, BPO, DRPO and BPO+DRPO on the same prompts, the same target and the same judge.

Each arm's answer gets DRPO's dynamic reward (aspects chosen per prompt, each rated 1-5), and each
treated arm is compared with the raw answer the paper's way: FastChat's ``pair-v2`` judge in both
orders, a win or a loss only when both orders agree. Every call goes through the DRPO session, so
it is cached (a rerun resumes), budgeted and concurrent.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.alignment import Alignment
from bpo_plugins.drpo.calls import CallFailed
from bpo_plugins.drpo.pipeline import AlignmentPipeline
from bpo_plugins.drpo.session import Session
from bpo_plugins.rewriter import Rewriter

ARMS = ("raw", "bpo", "drpo", "bpo+drpo")


def arm_conversations(prompts: Sequence[str], arms: Sequence[str], alignment: Alignment | None,
                      rewriter: Rewriter | None) -> dict[str, list[list[dict[str, Any]]]]:
    """What the target is sent for each prompt under each arm (BPO's rewrites are computed once)."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}: use {', '.join(ARMS)}")
    if any("drpo" in a for a in arms) and alignment is None:
        raise ValueError("the drpo arms need a DRPO alignment (a preset name or an artifact)")
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    treatments = {"bpo": (None, True), "drpo": (alignment, False), "bpo+drpo": (alignment, True)}
    out = {}
    for arm in arms:
        if arm == "raw":
            out[arm] = conversations
        else:
            aligned, bpo = treatments[arm]
            out[arm] = [a.messages for a in AlignmentPipeline(aligned, rewriter, bpo=bpo).align_batch(conversations)]
    return out


async def _answer(session: Session, messages: list[dict[str, Any]], alignment: Alignment | None) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    texts = await session.call(session.roles["base"], messages[-1]["content"], system=system)
    return alignment.answer(texts[0]) if alignment is not None and system is not None else texts[0].strip()


def compare_arms(session: Session, prompts: Sequence[str], conversations: dict[str, list[list[dict[str, Any]]]],
                 judge_prompt: dict[str, str], alignment: Alignment | None, *,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    from bpo_plugins.pairwise import outcome, pair_prompt, verdict

    arms = list(conversations)

    async def pairwise(question: str, treated: str, raw: str) -> str:
        verdicts = []
        for first, second in ((treated, raw), (raw, treated)):
            texts = await session.call(session.roles["judge"], pair_prompt(judge_prompt, question, first, second),
                                       system=judge_prompt["system_prompt"])
            verdicts.append(verdict(texts[0]))
        return outcome(*verdicts)

    async def one(i: int) -> dict[str, Any]:
        prompt = prompts[i]
        try:
            answers = dict(zip(arms, await asyncio.gather(*(
                _answer(session, conversations[arm][i], alignment if "drpo" in arm else None) for arm in arms))))
            ratings = dict(zip(arms, await asyncio.gather(*(session.rate(prompt, answers[arm]) for arm in arms))))
            versus = {}
            if "raw" in answers:
                treated = [a for a in arms if a != "raw"]
                versus = dict(zip(treated, await asyncio.gather(*(pairwise(prompt, answers[a], answers["raw"]) for a in treated))))
        except CallFailed as exc:
            session.skips["call_failed"] += 1
            session.warn(f"prompt skipped: {exc}")
            return {"prompt": prompt, "skipped": str(exc)}
        finally:
            if progress:
                progress(1)
        return {"prompt": prompt, "answers": answers, "versus_raw": versus,
                "ratings": {a: r.to_dict() if r else None for a, r in ratings.items()}}

    async def run() -> list[dict[str, Any]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await session.aclose_clients()

    rows = asyncio.run(run())
    return {"arms": arms, "summary": summarize(arms, rows), "rows": rows, "roles": session.roles_described(),
            "usage": session.ledger.to_dict(), "skips": dict(session.skips), "warnings": session.warnings}


def summarize(arms: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arm in arms:
        rated = [r["ratings"][arm] for r in rows if r.get("ratings", {}).get(arm)]
        aspects: dict[str, list[float]] = defaultdict(list)
        for rating in rated:
            for aspect, score in rating["scores"].items():
                aspects[aspect].append(score)
        votes = [r["versus_raw"][arm] for r in rows if arm in r.get("versus_raw", {})]
        summary[arm] = {
            "n_rated": len(rated), "reward": _mean([r["reward"] for r in rated]),
            "aspects": {a: _mean(v) for a, v in sorted(aspects.items())},
            "versus_raw": {k: round(100 * votes.count(k) / len(votes), 1) for k in ("win", "tie", "lose")} if votes else None,
        }
    return summary


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def write_comparison(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(comparison_markdown(report), encoding="utf-8")
    plot_comparison(report, out / "compare.png")


def comparison_markdown(report: dict[str, Any]) -> str:
    summary, arms = report["summary"], report["arms"]
    aspects = sorted({a for arm in arms for a in summary[arm]["aspects"]})
    lines = ["# Raw vs BPO vs DRPO vs BPO+DRPO", "", *[f"- {role}: `{model}`" for role, model in report["roles"].items()], "",
             "## Dynamic reward (1-5), per aspect", "", "| arm | n | reward | " + " | ".join(aspects) + " |",
             "|---|---|---|" + "---|" * len(aspects)]
    for arm in arms:
        row = summary[arm]
        lines.append(f"| {arm} | {row['n_rated']} | {row['reward']} | " + " | ".join(str(row["aspects"].get(a, "")) for a in aspects) + " |")
    lines += ["", "## Pairwise against raw (pair-v2, both orders)", "", "| arm | win % | tie % | lose % |", "|---|---|---|---|"]
    for arm in arms:
        versus = summary[arm]["versus_raw"]
        if versus:
            lines.append(f"| {arm} | {versus['win']} | {versus['tie']} | {versus['lose']} |")
    for warning in report.get("warnings", []):
        lines.append(f"\n- warning: {warning}")
    return "\n".join(lines) + "\n"


def plot_comparison(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpo_plugins.pairwise import win_tie_lose_bars

    summary, arms = report["summary"], report["arms"]
    aspects = sorted({a for arm in arms for a in summary[arm]["aspects"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        left.bar([x + i * width for x in range(len(aspects))], [summary[arm]["aspects"].get(a) or 0 for a in aspects], width, label=arm)
    left.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(aspects))], aspects, fontsize=7, rotation=30)
    left.set_ylim(0, 5)
    left.set_title("dynamic reward per aspect")
    left.legend(fontsize=8)
    win_tie_lose_bars(right, {a: summary[a]["versus_raw"] for a in arms if summary[a]["versus_raw"]}, "against raw (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

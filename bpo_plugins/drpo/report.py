"""A search's figures as ``report.json``, ``report.md`` and ``report.png`` (score per level)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    plot_levels(report["levels"], out / "report.png")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# DRPO search", ""]
    if report.get("stopped"):
        lines += [f"**Stopped early:** {report['stopped']}. The artifact holds the best prompt so far.", ""]
    for warning in report.get("warnings", []):
        lines.append(f"- warning: {warning}")
    lines += ["", "## Models", "", *[f"- {role}: `{model}`" for role, model in report["roles"].items()], ""]
    if report.get("guards"):
        lines += ["## Our additions (docs/faithfulness.md)", "",
                  *[f"- {name.replace('_', ' ')}: {'on' if on else 'off'}" for name, on in report["guards"].items()], ""]
    final = report.get("final_check")
    if final:
        verdict = "beats" if final["beats_initial"] else "does not beat"
        lines += ["## Final check on held-out seeds", "",
                  f"The winner scores {final['winner_mean']} against the initial prompt's {final['initial_mean']}: it {verdict} it.", "",
                  "| candidate | held-out mean | n |", "|---|---|---|"]
        for row in final["candidates"]:
            name = "initial prompt" if row["initial"] else row["prompt"][:60].replace("\n", " ").replace("|", "/") + "..."
            lines.append(f"| {name} | {row['held_out_mean']} | {row['n']} |")
        lines.append("")
    if report.get("root_reward") is not None:
        lines += [f"The initial prompt's reward at level 0: {report['root_reward']} (in no path mean, as in DRPO's beam).", ""]
    lines += ["## Levels", "", "| level | source | children | carried | best reward | best path mean | live calls | cost $ |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {h['level']} | {h['source']} | {h['children']} | {h['carried']} | {h['best_reward']} | {_or_dash(h['best_path_mean'])} "
              f"| {h['live_calls']} | {h['cost_usd']} |" for h in report["levels"]]
    lines += ["", "## Calls", "", "| role | live | cached | failed | retries | input tokens | output tokens | cost $ |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {role} | {u['calls']} | {u['cached']} | {u['failed']} | {u['retries']} | {u['input_tokens']} | {u['output_tokens']} "
              f"| {u['cost_usd']} |" for role, u in report["usage"].items()]
    if report.get("skips"):
        lines += ["", "## Skipped or corrected samples", "", *[f"- {reason}: {n}" for reason, n in sorted(report["skips"].items())]]
    lines += ["", "## Winning prompt", "", "```text", report["winner"], "```", ""]
    return "\n".join(lines)


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def plot_levels(levels: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        from bpo_plugins.drpo.session import log

        log.warning("no report.png: the plot needs matplotlib (pip install 'bpo-plugins[drpo]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = [h["level"] for h in levels]
    ranked = [h for h in levels if h["best_path_mean"] is not None]  # the root has no path mean
    ax.plot([h["level"] for h in ranked], [h["best_path_mean"] for h in ranked], marker="o", label="best path mean (ranks the beam)")
    ax.plot(xs, [h["best_reward"] for h in levels], marker="x", linestyle="--", label="best reward at the level")
    ax.set_xlabel("level")
    ax.set_ylabel("dynamic reward (1-5)")
    ax.set_ylim(1, 5.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("DRPO search")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

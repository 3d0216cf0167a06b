"""``bpo data selfplay``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bpo_plugins.inputs import UsageError
from bpo_plugins.training.scores import (
    LIKELIHOOD_TIE_BAND,
)
from bpo_plugins.training.selfplay.config import PAIR_MARGIN, SHIPPED, SelfplayConfig
from bpo_plugins.training.selfplay.rounds import heldout_table, markdown, run

# --- command line -----------------------------------------------------------------------------


def selfplay_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: pairs, adapters, scores, selfplay.json/.md.")] = Path("runs/selfplay"),
    bpo: Annotated[Path, typer.Option("--bpo", help="BPO pairs with good_res/bad_res (20% held out).")] = Path("tests/data/bpo/bpo_val.json"),
    hh: Annotated[Path | None, typer.Option("--hh", help="HH-RLHF transcripts, opt-in (single-turn ones are used; see the results README).")] = None,
    reference: Annotated[list[Path] | None, typer.Option("--reference", help="Dolly/Self-Instruct set: reference preferred, the target's answer rejected.")] = None,
    preference: Annotated[list[Path] | None, typer.Option("--preference", help="Preference file ({prompt, context?, chosen, rejected} rows, e.g. bpo data mix's coachlm.triples.jsonl): its prompts join the rounds, judged by its chosen and rejected responses.")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=0, help="0: only the held-out figures of the raw prompt, BPO's reference and --start-adapter (scores an adapter trained elsewhere).")] = 2,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="New prompts per round.")] = 40,
    num_candidates: Annotated[int, typer.Option("--num-candidates", "-n", min=1, help="Aggressive-mode candidates per prompt.")] = 8,
    margin: Annotated[float, typer.Option("--margin", help="Nats/token a candidate must beat the raw prompt by. A resumed run selects again from its stored scores; a round already trained on another selection stops with exit 2 (copy its pairs.jsonl into a new --out).")] = LIKELIHOOD_TIE_BAND,
    target: Annotated[str, typer.Option("--target", help="Target model: registry name, folder, or API model (with --target-base-url).")] = "smollm2-135m-instruct",
    target_base_url: Annotated[str | None, typer.Option("--target-base-url")] = None,
    base_model: Annotated[str, typer.Option("--base-model", help="The optimizer's base model.")] = "smollm2-135m-instruct",
    start_adapter: Annotated[str | None, typer.Option("--start-adapter", help="First round's adapter: 'shipped' (bpo-small), a folder, or 'none'.")] = SHIPPED,
    runtime: Annotated[str, typer.Option("--runtime", help="auto (GenAI int8 for the bundled base) | transformers")] = "auto",
    heldout_limit: Annotated[int | None, typer.Option("--heldout-limit", min=1, help="Score only the first k held-out pairs.")] = None,
    method: Annotated[str, typer.Option("--method", help="Each round's training: sft (expert iteration from the base) or dpo (TRL's DPO on the adapter the round drew from, that adapter frozen as the reference).")] = "sft",
    dpo_beta: Annotated[float, typer.Option("--dpo-beta", min=0.0, help="DPO's beta: how near the reference the adapter stays.")] = 0.1,
    pair_margin: Annotated[float, typer.Option("--pair-margin", min=0.0, help="DPO: nats/token a prompt's best version must beat its worst by to give a pair.")] = PAIR_MARGIN,
    epochs: Annotated[float | None, typer.Option("--epochs", help="SFT epochs per round (DPO: train's dpo_epochs, 2).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", min=1)] = 128,
    response_tokens: Annotated[int, typer.Option("--response-tokens", min=1, help="Tokens of each response the likelihood scores.")] = 128,
    measure: Annotated[int | None, typer.Option("--measure", min=1, help="Only time candidates and scoring on this many prompts (cost.json).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 42,
) -> None:
    """Optimized-prompt pairs without a teacher: best-of-N aggressive rewrites judged by the target's own
    likelihood preference, guarded, then SFT or DPO, in rounds; figures on a fixed held-out BPO split."""
    if runtime not in ("auto", "transformers"):
        raise UsageError(f"--runtime {runtime!r}: use auto or transformers")
    if method not in ("sft", "dpo"):
        raise UsageError(f"--method {method!r}: use sft or dpo")
    for path in [bpo, *([] if hh is None else [hh]), *(reference or []), *(preference or [])]:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    config = SelfplayConfig(
        out=str(out), bpo=str(bpo), hh=None if hh is None else str(hh), references=[str(r) for r in reference or []],
        preferences=[str(p) for p in preference or []],
        rounds=rounds, prompts=prompts, num_candidates=num_candidates, margin=margin, target=target, target_base_url=target_base_url,
        base_model=base_model, start_adapter=None if start_adapter in (None, "none") else start_adapter, runtime=runtime,
        heldout_limit=heldout_limit, answer_tokens=answer_tokens, response_tokens=response_tokens, seed=seed,
        method=method, dpo_beta=dpo_beta, pair_margin=pair_margin,
    )
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps}.items() if v is not None}
    report = run(config, measure=measure, train_overrides=overrides)
    if measure:
        typer.echo(json.dumps(report["measure"], indent=2))
    else:
        typer.echo(markdown(report))
    typer.echo(f"figures in {out}/{'cost.json' if measure else 'selfplay.json, selfplay.md'}", err=True)



def table_command(
    reports: Annotated[list[str], typer.Argument(help="LABEL=selfplay.json (or a bare path), one per run: their arms side by side.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the table here too (Markdown).")] = None,
) -> None:
    """One held-out table for several ``bpo data selfplay`` runs on one split: raw and BPO's reference once, then
    each run's starting optimizer (each adapter once) and its rounds. LABEL names a run's one new version (its
    round, or its starting adapter for a ``--rounds 0`` run); a run of several rounds gives "LABEL, round K"."""
    versions: dict[str, dict] = {}
    split: dict | None = None
    round_adapters: set[str] = set()  # adapters an earlier run trained: a later run starting from one adds no row
    for spec in reports:
        label, path = _label_and_path(spec)
        report = _read_report(path)
        try:
            config = report["config"]
            this_split = {"heldout": report["heldout"], **{key: config.get(key) for key in _SPLIT_SETTINGS}}
            if split is not None and this_split != split:
                changed = ", ".join(k for k in this_split if this_split[k] != split[k])
                raise UsageError(f"{path}: another held-out split or target than the first report's ({changed}): one table needs one split")
            split = this_split
            rows = _report_rows(report, label, round_adapters)
        except (KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"{path}: not a bpo data selfplay report (selfplay.json): {error!r} missing or malformed") from None
        for name, row, shared in rows:
            if name in versions and not shared:
                raise UsageError(f"{path}: a second row named {name!r}: give each report its own LABEL=")
            versions.setdefault(name, row)
    lines = "\n".join(heldout_table(list(versions.values()))) + "\n"
    if out is not None:
        out.write_text(lines)
    typer.echo(lines, nl=False)


#: What makes two runs' figures comparable: the same held-out pairs, target and scoring lengths.
_SPLIT_SETTINGS = ("bpo", "seed", "heldout_fraction", "heldout_limit", "target", "target_base_url", "response_tokens", "answer_tokens")


def _label_and_path(spec: str) -> tuple[str, Path]:
    if Path(spec).is_file():  # a bare path may hold "=" itself
        return "", Path(spec)
    label, _, path = spec.partition("=")
    return label, Path(path)


def _report_rows(report: dict, label: str, round_adapters: set[str]) -> list[tuple[str, dict, bool]]:
    """(name, figures, shared by every run) per version of one report; records the adapters its rounds trained."""
    import os

    config, baselines, rounds = report["config"], report["baselines"], report["rounds"]
    rows = [(baselines["raw"]["version"], baselines["raw"], True), (baselines["reference"]["version"], baselines["reference"], True)]
    start = baselines["start"]
    if os.path.normpath(str(config.get("start_adapter"))) not in round_adapters:
        rows.append((label, {**start, "version": label}, False) if label and not rounds else (start["version"], start, True))
    for figures in rounds:
        name = label if label and len(rounds) == 1 else f"{label or config['out']}, round {figures['round']}"
        rows.append((name, {**figures["heldout"], "version": name}, False))
        round_adapters.add(os.path.normpath(os.path.join(config["out"], f"round-{figures['round']}", "adapter")))
    return rows


def _read_report(path: Path) -> dict:
    """A ``selfplay.json``, or a one-line usage error naming the file."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(report, dict) or not {"config", "baselines", "rounds", "heldout"} <= report.keys():
        raise UsageError(f"{path}: not a bpo data selfplay report (selfplay.json)")
    return report

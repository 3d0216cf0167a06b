"""``bpo data build``, ``bpo train`` and ``bpo eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bpo_plugins.inputs import UsageError, usage_errors
from bpo_plugins.registry import DEFAULT_MODEL

__all__ = ["data_app", "evaluate", "train"]

data_app = typer.Typer(help="Build (prompt -> optimized prompt) training pairs from preference data.", no_args_is_help=True)


def train(
    data: Annotated[list[Path] | None, typer.Option("--data", "-d", help="BPO-format JSON/JSONL pair files.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="JSON file of TrainConfig fields.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o")] = None,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    lora_r: Annotated[int | None, typer.Option("--lora-r", min=1, help="LoRA rank; alpha is set to twice the rank.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    template: Annotated[str | None, typer.Option("--template", help="auto | bpo | bpo-chat")] = None,
    exclude: Annotated[list[Path] | None, typer.Option("--exclude", help="Eval sets kept out of training.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 weights (GPUs).")] = False,
) -> None:
    """Fine-tune an optimizer (LoRA by default); loss on the optimized-prompt tokens only."""
    from bpo_plugins.training.sft import TrainConfig
    from bpo_plugins.training.sft import train as run_training

    overrides = {
        "data": [str(d) for d in data] if data else None, "base_model": base_model, "out": out, "epochs": epochs,
        "max_steps": max_steps, "learning_rate": learning_rate, "batch_size": batch_size, "template": template,
        "exclude": [str(e) for e in exclude] if exclude else None, "seed": seed,
        "lora_r": lora_r, "lora_alpha": None if lora_r is None else 2 * lora_r,
    }
    if full:
        overrides["lora"] = False
    if bf16:
        overrides["bf16"] = True
    if config is not None:
        cfg = TrainConfig.from_file(config, **overrides)
    elif data:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    else:
        raise typer.BadParameter("give --data or --config")
    figures = run_training(cfg)
    typer.echo(json.dumps({k: v for k, v in figures.items() if k != "log_history"}, indent=2))


@data_app.command("build")
def data_build(
    inputs: Annotated[list[Path], typer.Argument(help="Preference files: BPO JSON/JSONL, {prompt, chosen, rejected} JSONL, HH-RLHF (.jsonl.gz).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="THUDM/BPO-schema JSONL of kept pairs.")],
    teacher_model: Annotated[str, typer.Option("--teacher-model", help="Teacher model: API name, registry name or path.")] = "gpt-4o-mini",
    teacher_backend: Annotated[str, typer.Option("--teacher-backend", help="auto (by the model spec) | openai | anthropic | transformers | onnx")] = "auto",
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible teacher URL (vLLM...).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 8,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.9,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 42,
) -> None:
    """Ask a teacher LLM to improve each prompt from its good/bad responses, then filter and dedupe."""
    import random

    from tqdm import tqdm

    from bpo_plugins.training.build import build
    from bpo_plugins.training.data import read_triplets

    triplets = [t for path in inputs for t in read_triplets(path)]
    if not triplets:
        raise typer.BadParameter(f"no preference triplets in {', '.join(map(str, inputs))}")
    random.Random(seed).shuffle(triplets)
    triplets = triplets[:limit] if limit else triplets
    from bpo_plugins.backends import load_backend

    with usage_errors():
        teacher = load_backend(teacher_model, backend=teacher_backend, base_url=base_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(triplets), desc="teacher", unit="pair") as bar:
        report = build(triplets, teacher, out, concurrency=concurrency, temperature=temperature,
                       max_new_tokens=max_new_tokens, progress=bar.update)
    typer.echo(json.dumps(report.to_dict(), indent=2))
    typer.echo(f"kept {report.kept} pairs in {out}; report in {out.with_suffix('.report.json')}", err=True)


def evaluate(
    sets: Annotated[list[Path], typer.Argument(help="Eval files: BPO pairs, dolly_eval.json, self_instruct_eval.json, vicuna_eval.jsonl...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json, eval_report.md, eval_plot.png and the call cache.")] = Path("runs/eval"),
    model: Annotated[list[str], typer.Option("--model", "-m", help="Optimizer(s) to compare: registry name, folder or hub id.")] = [DEFAULT_MODEL],  # noqa: B006
    adapter: Annotated[Path | None, typer.Option("--adapter", help="LoRA adapter for a --model that is a base.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="auto (the default runtime: GenAI int8) | transformers (fp32) | onnx.")] = "auto",
    template: Annotated[str | None, typer.Option("--template", help="bpo | bpo-chat | prompt-engineer")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Items per set.")] = None,
    target_model: Annotated[str | None, typer.Option("--target-model", help="Target LLM for the judge figures.")] = None,
    target_backend: Annotated[str, typer.Option("--target-backend", help="auto (by the model spec) | openai | anthropic | transformers | onnx")] = "auto",
    target_base_url: Annotated[str | None, typer.Option("--target-base-url")] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Judge LLM (FastChat pair-v2).")] = None,
    judge_backend: Annotated[str, typer.Option("--judge-backend", help="auto (by the model spec) | openai | anthropic | transformers | onnx")] = "auto",
    judge_base_url: Annotated[str | None, typer.Option("--judge-base-url")] = None,
    judge_prompts: Annotated[Path | None, typer.Option("--judge-prompts", help="FastChat judge prompts (default: the packaged copy).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    mode: Annotated[str, typer.Option("--mode", help="greedy | stable | aggressive")] = "greedy",
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", min=1, help="Tokens per target answer.")] = 256,
    drpo: Annotated[str | None, typer.Option("--drpo", help="A DRPO preset or artifact: compare raw, BPO, DRPO and BPO+DRPO.")] = None,
    arms: Annotated[str, typer.Option("--arms", help="With --drpo: the arms to compare, comma-separated.")] = "raw,bpo,drpo,bpo+drpo",
) -> None:
    """Proxy figures for each optimizer, and (with --target-model and --judge-model) the pairwise win rate.
    With --drpo, raw, BPO, DRPO and BPO+DRPO answers get DRPO's per-aspect reward and pair-v2 against raw."""
    from tqdm import tqdm

    from bpo_plugins.backends import load_backend
    from bpo_plugins.pairwise import load_judge_prompt
    from bpo_plugins.training import evaluate as ev

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    alignment = _drpo_alignment(drpo, arm_list, arms, bool(target_model and judge_model)) if drpo else None
    # Every input file is read before any work, so a bad one fails at once.
    data = {path.stem: ev.read_eval_set(path, limit) for path in sets}
    prompt = load_judge_prompt(judge_prompts) if target_model and judge_model else {}
    out.mkdir(parents=True, exist_ok=True)
    proxy, rewrites, first = _proxy_runs(model, data, out, backend=backend, template=template, max_new_tokens=max_new_tokens,
                                         mode=mode, adapter=adapter)
    judged = []
    if target_model and judge_model:
        with usage_errors():
            target = load_backend(target_model, backend=target_backend, base_url=target_base_url)
            judge = load_backend(judge_model, backend=judge_backend, base_url=judge_base_url)
        cache = ev.CallCache(out / "calls.jsonl")
        # With --drpo the arms comparison below judges BPO against raw itself.
        for (name, set_name), texts in ({} if drpo else rewrites).items():
            with tqdm(total=len(texts), desc=f"judge {name} on {set_name}", unit="prompt") as bar:
                row = ev.judge_set(set_name, data[set_name], texts, target, judge, prompt, cache, answer_tokens=answer_tokens,
                                   progress=bar.update)
            judged.append({**row, "optimizer": name})
    if drpo:
        _compare_arms(data, alignment, arm_list, first, target, judge, prompt, out, answer_tokens)
    report = {"proxy": proxy, "judge": judged}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval_report.md").write_text(ev.markdown_report(proxy, judged))
    ev.plot(proxy, judged, out / "eval_plot.png")
    typer.echo(ev.markdown_report(proxy, judged))
    typer.echo(f"figures in {out}/eval.json, eval_report.md, eval_plot.png", err=True)


def _drpo_alignment(drpo: str, arm_list: list[str], arms: str, judged: bool) -> Any:
    """``--drpo``'s alignment, loaded before any rewrite; bad arms or a missing target or judge are usage errors."""
    from bpo_plugins.drpo import load_alignment
    from bpo_plugins.drpo.compare import ARMS

    if not judged:
        raise UsageError("--drpo compares answers: give --target-model and --judge-model too")
    if not arm_list or set(arm_list) - set(ARMS):
        raise UsageError(f"--arms {arms!r}: use some of {', '.join(ARMS)}")
    with usage_errors():
        return load_alignment(drpo)  # a bad name fails now, before any rewrite


def _proxy_runs(models: list[str], data: dict[str, Any], out: Path, **options: Any) -> tuple[dict[str, dict], dict[tuple[str, str], list[str]], Any]:
    """Each optimizer's proxy figures on each set (its rows written to ``out``), its rewrites, and the first
    optimizer (the one --drpo compares), each resolved as every spec is."""
    from tqdm import tqdm

    from bpo_plugins import Rewriter
    from bpo_plugins.training import evaluate as ev

    embedder = ev.Embedder()
    proxy: dict[str, dict] = {}
    rewrites: dict[tuple[str, str], list[str]] = {}
    first: Rewriter | None = None
    for name in models:
        with usage_errors():
            rewriter = Rewriter.from_spec(name, **options)
        first = first or rewriter
        for set_name, items in data.items():
            with tqdm(total=len(items), desc=f"rewrite {name} on {set_name}", unit="prompt") as bar:
                figures, rows = ev.proxy_figures(rewriter, items, embedder, progress=bar.update)
            proxy[f"{name}:{set_name}"] = figures
            rewrites[(name, set_name)] = [r["rewritten"] for r in rows]
            (out / f"rows_{Path(name).name}_{set_name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return proxy, rewrites, first


def _compare_arms(data: dict, alignment, arms: list[str], rewriter, target, judge, judge_prompt: dict[str, str], out: Path,
                  answer_tokens: int) -> None:
    from tqdm import tqdm

    from bpo_plugins.drpo.compare import arm_conversations, compare_arms, comparison_markdown, write_comparison
    from bpo_plugins.drpo.session import Session, default_roles

    session = Session(default_roles(target, judge, judge, answer_tokens=answer_tokens), out / "calls.sqlite")
    for set_name, items in data.items():
        prompts = [item.prompt if item.context is None else f"{item.prompt}\n\n{item.context}" for item in items]
        conversations = arm_conversations(prompts, arms, alignment, rewriter)
        with tqdm(total=len(prompts), desc=f"compare arms on {set_name}", unit="prompt") as bar:
            report = compare_arms(session, prompts, conversations, judge_prompt, alignment, progress=bar.update)
        write_comparison({**report, "set": set_name, "drpo": alignment.provenance.get("preset") or alignment.provenance.get("base_model")},
                         out / f"compare_{set_name}")
        typer.echo(comparison_markdown(report))
    session.close()


from bpo_plugins.training.selfplay import selfplay_command, table_command  # noqa: E402  (models load lazily, in the command)

data_app.command("selfplay")(selfplay_command)
data_app.command("selfplay-table")(table_command)

from bpo_plugins.training.sources import mix_command  # noqa: E402

data_app.command("mix")(mix_command)

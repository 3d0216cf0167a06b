"""``bpo drpo search`` and ``bpo drpo icl``: DRPO from the command line, on any backend per role."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bpo_plugins.drpo.calls import CONCURRENCY, RETRIES
from bpo_plugins.drpo.search_config import SearchConfig
from bpo_plugins.drpo.session import ANSWER_TOKENS
from bpo_plugins.inputs import UsageError, read_text, usage_errors

drpo_app = typer.Typer(help="DRPO: search a system prompt and in-context examples with dynamic rewards.", no_args_is_help=True)

#: The search's defaults are SearchConfig's: the options below show them, they do not copy them.
_DEFAULTS = SearchConfig()

ModelOption = Annotated[str | None, typer.Option(help="MODEL or MODEL@URL: an API model (gpt-4o-mini, claude-...), a local model, or a model on an OpenAI-compatible server.")]
CapOption = Annotated[list[str] | None, typer.Option(help="ROLE=N (base, metrics, judge, optimizer), or N for every role. Repeatable.")]
PriceOption = Annotated[list[str] | None, typer.Option("--price", help="ROLE=IN/OUT dollars per million tokens, or IN/OUT for every role. Repeatable.")]
LenientOption = Annotated[bool, typer.Option("--lenient-parsing/--strict-parsing", help="Our guard: read JSON in prose, renamed aspects and '4/5' scores, and ask once more; strict reads replies as DRPO's parser does.")]
RefusalOption = Annotated[bool, typer.Option("--refusal-correction/--no-refusal-correction", help="Our guard: raise to 5 the Compliance score of a refusal of a harmful query.")]


def _backend(spec: str, dry_run: bool = False) -> Any:
    from bpo_plugins.backends import load_backend

    # The DRPO caller retries with backoff itself. A dry run sends nothing, so it needs no API key.
    with usage_errors():
        return load_backend(spec, max_retries=0, api_key="dry-run" if dry_run else None)


def _read_seeds(path: Path) -> Any:
    """A user's seed queries; a bad file fails naming itself and its line."""
    from bpo_plugins.drpo.seeds import read_seeds

    read_text(path)  # missing, unreadable or not UTF-8: the file, line and column
    with usage_errors():  # a row without a query names its row
        return read_seeds(path)


def _per_role(values: list[str] | None, what: str, parse: Any) -> dict[str, Any]:
    from bpo_plugins.drpo.calls import ROLES

    out: dict[str, Any] = {}
    for value in values or []:
        role, sep, amount = value.rpartition("=")
        roles = [role] if sep else list(ROLES)
        if sep and role not in ROLES:
            raise UsageError(f"{what}: unknown role {role!r}: use {', '.join(ROLES)}")
        try:
            parsed = parse(amount)
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None
        out.update(dict.fromkeys(roles, parsed))
    return out


def _session_parts(base: str | None, judge: str | None, optimizer: str | None, metrics: str | None, prices: list[str] | None,
                   max_calls: list[str] | None, max_tokens: list[str] | None, max_cost: list[str] | None,
                   dry_run: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from bpo_plugins.drpo.calls import Caps, Price

    if not base or not judge:
        raise UsageError("give --base (the model to align) and --judge (the judge LLM; it is also the optimizer and metrics LLM unless named)")
    price = _per_role(prices, "--price", Price.parse)
    calls = _per_role(max_calls, "--max-calls", int)
    tokens = _per_role(max_tokens, "--max-tokens", int)
    cost = _per_role(max_cost, "--max-cost", float)
    caps = {r: Caps(calls.get(r), tokens.get(r), cost.get(r)) for r in {*calls, *tokens, *cost}}
    backends = {"base": _backend(base, dry_run), "judge": _backend(judge, dry_run)}
    backends["optimizer"] = _backend(optimizer, dry_run) if optimizer else backends["judge"]
    backends["metrics"] = _backend(metrics, dry_run) if metrics else backends["judge"]
    return backends, price, caps


@drpo_app.command("search")
def search(
    base: ModelOption = None,
    judge: ModelOption = None,
    optimizer: ModelOption = None,
    metrics: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for alignment.json, the report, the checkpoint and the call cache.")] = Path("runs/drpo"),
    seeds: Annotated[Path | None, typer.Option(help="Seed queries (.txt lines, or JSON/JSONL with 'query'); default DRPO's 180.")] = None,
    examples: Annotated[Path | None, typer.Option(help="Example bank from 'bpo drpo icl' (default DRPO's 16).")] = None,
    depth: Annotated[int, typer.Option(min=1)] = _DEFAULTS.depth,
    beam_width: Annotated[int, typer.Option(min=1)] = _DEFAULTS.beam_width,
    num_actions: Annotated[int, typer.Option(min=1)] = _DEFAULTS.num_actions,
    max_extensions: Annotated[int, typer.Option(min=0)] = _DEFAULTS.max_extensions,
    holdout: Annotated[int, typer.Option(min=0, help="Held-out seeds for the final check.")] = _DEFAULTS.holdout,
    prompt_format: Annotated[str, typer.Option("--format", help="chat (DRPO's inference layout) | search (DRPO's search layout as a chat system message, as it searched API models) | raw (DRPO's search layout as one text, no chat template: a local model or /v1/completions) | base (DRPO's auto_model.py raw layout for a base model).")] = _DEFAULTS.format,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Tokens per base-model answer (DRPO: 2048).")] = ANSWER_TOKENS,
    seed: Annotated[int, typer.Option(help="Fixes the seed-query order and the proposals' sampling salt.")] = _DEFAULTS.seed,
    request_seed: Annotated[int, typer.Option(help="The 'seed' every OpenAI request carries (DRPO: 0); -1 sends none.")] = 0,
    max_prompt_chars: Annotated[int, typer.Option(min=0, help="Our guard, off (0) by default: drop proposals longer than this many characters.")] = 0,
    initial_prompt: Annotated[str, typer.Option(help="The root of the search.")] = _DEFAULTS.initial_prompt,
    price: PriceOption = None,
    max_calls: CapOption = None,
    max_tokens: CapOption = None,
    max_cost: Annotated[list[str] | None, typer.Option(help="ROLE=USD, or USD for every role. Repeatable.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent calls per HTTP model.")] = CONCURRENCY,
    retries: Annotated[int, typer.Option(min=0, help="Retries, with backoff, on 429, 5xx and timeouts.")] = RETRIES,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the projected calls, tokens and cost per role; call nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the checkpoint in --out (cached calls are still reused).")] = False,
    final_check: Annotated[bool, typer.Option("--final-check/--no-final-check", help="Our guard: re-score the top candidates and the initial prompt on --holdout unseen seeds and keep the best; off, DRPO's best beam wins and every seed goes to the search.")] = _DEFAULTS.final_check,
    lenient_parsing: LenientOption = _DEFAULTS.lenient_parsing,
    refusal_correction: RefusalOption = _DEFAULTS.refusal_correction,
) -> None:
    """Search a system prompt for --base by DRPO's beam search; resumes from --out's checkpoint."""
    from bpo_plugins.drpo.formats import FORMATS
    from bpo_plugins.drpo.icl import read_examples
    from bpo_plugins.drpo.search import Search
    from bpo_plugins.drpo.session import default_roles

    if prompt_format not in FORMATS:
        raise UsageError(f"unknown --format {prompt_format!r}: use {', '.join(FORMATS)}")
    config = SearchConfig(beam_width=beam_width, num_actions=num_actions, depth=depth, max_extensions=max_extensions,
                          holdout=holdout, format=prompt_format, seed=seed, initial_prompt=initial_prompt, final_check=final_check,
                          lenient_parsing=lenient_parsing, refusal_correction=refusal_correction,
                          max_prompt_chars=max_prompt_chars or None)
    backends, prices, caps = _session_parts(base, judge, optimizer, metrics, price, max_calls, max_tokens, max_cost, dry_run)
    roles = default_roles(backends["base"], backends["judge"], backends["optimizer"], backends["metrics"], prices=prices,
                          answer_tokens=answer_tokens, num_actions=num_actions, prompt_format=FORMATS[prompt_format],
                          request_seed=None if request_seed < 0 else request_seed)
    with usage_errors():  # too few seeds, a bad example bank, a checkpoint of another search
        runner = Search(roles, out, config=config, seeds=_read_seeds(seeds) if seeds else None,
                        examples=read_examples(examples) if examples else None, caps=caps, concurrency=concurrency, retries=retries,
                        dry_run=dry_run)
    if dry_run:
        _print_plan(runner.plan(), caps)
        return
    _print_result(runner.run(fresh=fresh), out)


def _print_result(result: Any, out: Path) -> None:
    final = result.report["final_check"]
    if result.stopped:
        typer.secho(f"stopped early: {result.stopped}; the artifact holds the best prompt so far", err=True, fg=typer.colors.YELLOW)
    if final:
        verdict = "beats" if final["beats_initial"] else "does not beat"
        typer.echo(f"held-out reward {final['winner_mean']} vs the initial prompt's {final['initial_mean']}: the winner {verdict} it")
    cache = result.report["cache"]
    typer.echo(f"calls: {cache['live_calls']} live, {cache['cached_calls']} from the cache; cost ${result.alignment.provenance['cost_usd']}")
    typer.echo(f"artifact {out / 'alignment.json'}; report {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}", err=True)


def _print_plan(plan: dict[str, dict[str, Any]], caps: dict[str, Any]) -> None:
    typer.echo("projected upper bounds (no call made):")
    typer.echo(f"{'role':<10} {'calls':>7} {'input tok':>11} {'output tok':>11} {'cost $':>9}  model")
    for role, row in plan.items():
        cost = f"{row['cost_usd']:.4f}" if row["priced"] else "unpriced"
        cap = caps.get(role)
        capped = f"  (cap {', '.join(f'{k} {v}' for k, v in vars(cap).items() if v is not None)})" if cap else ""
        typer.echo(f"{role:<10} {row['calls']:>7} {row['input_tokens']:>11} {row['output_tokens']:>11} {cost:>9}  {row['model']}{capped}")
    total = {k: sum(r[k] for r in plan.values()) for k in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    typer.echo(f"{'total':<10} {total['calls']:>7} {total['input_tokens']:>11} {total['output_tokens']:>11} {total['cost_usd']:>9.4f}")


@drpo_app.command("icl")
def icl(
    base: ModelOption = None,
    judge: ModelOption = None,
    optimizer: ModelOption = None,
    metrics: ModelOption = None,
    queries: Annotated[Path | None, typer.Option(help="Queries to build examples for (.txt or JSON/JSONL); default the queries of DRPO's 16 examples.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The example bank (JSON); figures go to OUT.report.json.")] = Path("runs/drpo/examples.json"),
    rounds: Annotated[int, typer.Option(min=0, max=20, help="Rewrite-and-rescore rounds per query (DRPO: 5).")] = 5,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Tokens per base-model answer (DRPO: 2048).")] = ANSWER_TOKENS,
    lenient_parsing: LenientOption = True,
    refusal_correction: RefusalOption = True,
    price: PriceOption = None,
    max_calls: CapOption = None,
    max_tokens: CapOption = None,
    max_cost: Annotated[list[str] | None, typer.Option(help="ROLE=USD, or USD for every role.")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = CONCURRENCY,
    request_seed: Annotated[int, typer.Option(help="The 'seed' every OpenAI request carries (DRPO: 0); -1 sends none.")] = 0,
) -> None:
    """Build an in-context example bank by DRPO's loop: a critic rates the answer, the optimizer rewrites the latest answer, keep the best (ties go to the rewrite)."""
    from bpo_plugins.drpo.icl import optimize_examples
    from bpo_plugins.drpo.presets import icl_examples
    from bpo_plugins.drpo.rubrics import CRITIC_RUBRIC
    from bpo_plugins.drpo.seeds import Seed
    from bpo_plugins.drpo.session import Session, icl_roles

    seeds = _read_seeds(queries) if queries else [Seed(e.query, "drpo-examples") for e in icl_examples()]
    backends, prices, caps = _session_parts(base, judge, optimizer, metrics, price, max_calls, max_tokens, max_cost)
    roles = icl_roles(backends["base"], backends["judge"], backends["optimizer"], backends["metrics"], prices=prices,
                      answer_tokens=answer_tokens, request_seed=None if request_seed < 0 else request_seed)
    session = Session(roles, out.with_suffix(".calls.sqlite"), caps=caps, concurrency=concurrency, rubric=CRITIC_RUBRIC,
                      lenient=lenient_parsing, refusal_correction=refusal_correction)
    report = optimize_examples(session, seeds, out, rounds=rounds)
    session.close()
    if report["stopped"]:
        typer.secho(f"stopped early: {report['stopped']}; the bank holds the examples finished so far", err=True, fg=typer.colors.YELLOW)
    typer.echo(json.dumps({k: report[k] for k in ("n", "of", "mean_reward_first", "mean_reward_best", "skips")}))
    typer.echo(f"examples in {out}; figures in {out.with_suffix('.report.json')}", err=True)

"""The ``bpo`` command line: rewrite prompts, batch files and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from bpo_plugins.drpo.calls import DRPOError
from bpo_plugins.inputs import UsageError, read_prompt_rows, resume_jsonl, row_prompt, usage_errors
from bpo_plugins.onnx_export import ParityError
from bpo_plugins.registry import DEFAULT_MODEL
from bpo_plugins.result import MODES, ModelLoadError, RewriteError

__all__ = ["app", "main"]

app = typer.Typer(
    name="bpo",
    help="Black-Box Prompt Optimization: rewrite prompts so LLMs answer them better.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModeOption = Annotated[str, typer.Option("--mode", help=f"Decoding mode: {' | '.join(MODES)}.")]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Registry name (bpo-small), local folder, hub id, or API model name.")
]
BackendOption = Annotated[
    str, typer.Option("--backend", "-b", help="auto | transformers | onnx | openai | anthropic.")
]
BaseUrlOption = Annotated[
    str | None, typer.Option("--base-url", help="OpenAI-compatible server URL (vLLM, TGI, llama.cpp).")
]
def _done_rows(out: Path) -> int:
    """Rows already written by an earlier, interrupted run (a torn last line is cut, and rewritten)."""
    return len(resume_jsonl(out))


@app.command()
def optimize(
    text: Annotated[str | None, typer.Argument(help="The prompt to rewrite, or - to read stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSONL with 'prompt' and optional 'context'.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where --file results go (JSONL; resumes).")] = None,
    context: Annotated[str | None, typer.Option("--context", help="A passage kept verbatim, not rewritten.")] = None,
    mode: ModeOption = "greedy",
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = "auto",
    base_url: BaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 instead of falling back to the original.")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Prompts per generate call (default: by runtime).")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before falling back.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    cache: Annotated[Path | None, typer.Option("--cache", help="SQLite file for a persistent greedy cache.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Rewrite --file on Ray Data: an actor pool, one loaded model per actor.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="A running Ray cluster (default: a local one).")] = None,
    actors: Annotated[int, typer.Option("--actors", min=1, help="With --ray: actors, each holding one model.")] = 2,
) -> None:
    """Rewrite TEXT (or stdin, or a --file batch) with a BPO optimizer."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if (text is None) == (file is None):
        raise UsageError("give exactly one of TEXT, '-' (stdin) or --file")
    if file is not None and out is None:
        raise UsageError("--file needs --out for the results")
    if ray and file is None:
        raise UsageError("--ray rewrites a --file")
    spec = {"model": model, "backend": backend, "base_url": base_url, "mode": mode, "timeout_s": timeout, "max_new_tokens": max_new_tokens}
    if file is not None:
        assert out is not None
        _optimize_file(file, out, spec, strict=strict, cache=cache, batch_size=batch_size, ray_address=ray_address,
                       actors=actors, ray=ray)
        return
    with usage_errors():
        rewriter = _rewriter(spec, strict=strict, cache=cache)
    result = rewriter.rewrite(sys.stdin.read() if text == "-" else str(text), context=context)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    _show_result(result)


def _show_result(result: Any) -> None:
    """The prompt to send on; on a terminal, as a word diff of the original in colour. A pipe gets the
    plain text. The fallback reason goes to stderr either way."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if console.is_terminal:
        from bpo_plugins.diff import rich_diff, word_diff

        console.print(rich_diff(word_diff(result.original, result.rewritten)))
        if result.context is not None:
            console.print(f"\n{result.context}", markup=False)
    else:
        typer.echo(result.prompt)
    if result.fallback is not None:
        typer.secho(f"[fallback: {result.fallback.value}] {result.detail}", err=True, fg=typer.colors.YELLOW)


def _rewriter(spec: dict[str, Any], *, strict: bool, cache: Path | None) -> Any:
    from bpo_plugins import Rewriter

    return Rewriter.from_spec(**spec, strict=strict, cache_path=cache)


def _optimize_file(file: Path, out: Path, spec: dict[str, Any], *, strict: bool, cache: Path | None, batch_size: int | None,
                   ray: bool, ray_address: str | None, actors: int) -> None:
    """``bpo optimize --file``: rows rewritten locally or on Ray Data, appended to ``out`` (a rerun resumes)."""
    rows, done = read_prompt_rows(file), _done_rows(out)
    if ray:
        outcomes = _ray_outcomes(spec, rows[done:], batch_size, ray_address, actors)
        how: dict[str, Any] = {"engine": "ray", "actors": actors}
    else:
        from bpo_plugins.batching import file_batch_size

        with usage_errors():  # the flags are checked, and the model loaded, here
            rewriter = _rewriter(spec, strict=strict, cache=cache)
        batch = batch_size or file_batch_size(rewriter)
        outcomes = _local_outcomes(rewriter, rows[done:], batch)
        how = {"engine": "local", "batch_size": batch}
    _write_file(rows, done, outcomes, file, out, how)


def _local_outcomes(rewriter: Any, rows: list[dict[str, Any]], batch_size: int) -> Any:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        for result in rewriter.rewrite_batch([row_prompt(r) for r in chunk], contexts=[r.get("context") for r in chunk]):
            yield result.rewritten, result.fallback and result.fallback.value, result.detail


def _ray_outcomes(spec: dict[str, Any], rows: list[dict[str, Any]], batch_size: int | None, address: str | None, actors: int) -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'bpo-plugins[ray]'") from None
    from bpo_plugins.ray_data import rewrite_dataset

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar says enough; Ray Data logs each stage
    items = [{"prompt": row_prompt(r), "context": r.get("context") or ""} for r in rows]
    for out in rewrite_dataset(ray.data.from_items(items), actors=actors, batch_size=batch_size, **spec).iter_rows():
        yield out["rewritten"], out["fallback"], out["detail"]


def _write_file(rows: list[dict[str, Any]], done: int, outcomes: Any, file: Path, out: Path, how: dict[str, Any]) -> None:
    """Append each row with its outcome to ``out`` as it comes (a rerun resumes after the last whole line)."""
    import time

    from tqdm import tqdm

    reasons: Counter[str] = Counter()
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink, tqdm(total=len(rows), initial=done, desc="rewriting", unit="prompt") as bar:
        for row, (rewritten, fallback, detail) in zip(rows[done:], outcomes):
            reasons[fallback or "rewritten"] += 1
            sink.write(json.dumps({**row, "rewritten": rewritten, "fallback": fallback, "detail": detail}, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(1)
    seconds = time.perf_counter() - start
    stats = {"input": str(file), "rows": len(rows), "resumed_from": done, **how, "outcomes": dict(reasons),
             "seconds": round(seconds, 2), "prompts_per_s": round((len(rows) - done) / seconds, 3) if seconds else None}
    stats_path = out.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2))
    typer.echo(f"wrote {len(rows) - done} rows to {out} ({dict(reasons)}); figures in {stats_path}", err=True)


@app.command()
def bench(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="JSONL/JSON of prompts (e.g. vicuna_eval.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the figures go (JSON).")] = Path("bench.json"),
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = "auto",
    base_url: BaseUrlOption = None,
    mode: ModeOption = "greedy",
    limit: Annotated[int, typer.Option("--limit", min=1, help="Prompts to time.")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
) -> None:
    """Time rewrites: latency p50/p95, decode tokens/s and peak memory, written to JSON."""
    from bpo_plugins.bench import run_benchmark

    rows = read_prompt_rows(prompts)[:limit]
    from bpo_plugins import Rewriter

    with usage_errors():
        rewriter = Rewriter.from_spec(model, backend=backend, base_url=base_url, mode=mode, max_new_tokens=max_new_tokens, cache_size=0)
    figures = run_benchmark(rewriter, [row_prompt(r) for r in rows], batch_size=batch_size)
    figures.update(prompts_file=str(prompts), model=model, backend=rewriter.backend.name, mode=mode)
    out.write_text(json.dumps(figures, indent=2))
    for key in ("n", "latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_rss_mb", "fallback_rate", "load_s"):
        typer.echo(f"{key:>16}: {figures[key]}")
    typer.echo(f"figures written to {out}")


@app.command()
def serve(
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = "auto",
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    target: Annotated[str | None, typer.Option("--target", help="MODEL or MODEL@URL: the playground page shows its answers to the original and the rewrite.")] = None,
) -> None:
    """Serve a local model (any local runtime) over an OpenAI-compatible API, streaming included, and the
    playground page at / (type a prompt, see its rewrite)."""
    from bpo_plugins import Rewriter
    from bpo_plugins.backends.local import LocalBackend
    from bpo_plugins.spec import resolve_spec

    build_app = _server_module("local").build_app
    with usage_errors():
        spec = resolve_spec(model, backend=backend)
        target_spec = None if target is None else resolve_spec(target)
    if spec.kind != "local":
        raise UsageError(f"bpo serve runs local models (a registry name, folder or hub id), not {spec.kind} model {model!r}")
    rewriter = Rewriter.from_spec(spec)  # the page's optimizer shares the served model
    loaded = rewriter.backend
    if not isinstance(loaded, LocalBackend):  # pragma: no cover - every local runtime is a LocalBackend
        raise UsageError(f"{model!r} did not load as a local model")
    playground = _server_module("playground").Playground(rewriter, model, target_spec)
    _run_server(build_app(loaded, extra_routes=playground.routes()), host, port, f"serving {loaded.model_id} ({loaded.name})",
                page=True)


@app.command()
def proxy(
    upstream: Annotated[str | None, typer.Option("--upstream", help="The OpenAI-compatible base URL to forward to.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML or JSON settings (see bpo_plugins/server/config.py).")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="The BPO optimizer (default bpo-small).")] = None,
    optimizer_base_url: Annotated[str | None, typer.Option("--optimizer-base-url", help="Serve the optimizer from this OpenAI-compatible URL.")] = None,
    rewrite_timeout: Annotated[float | None, typer.Option("--rewrite-timeout", help="Seconds before the original prompt goes on.")] = None,
    no_rewrite: Annotated[bool, typer.Option("--no-rewrite", help="Relay only (measure the gateway's own overhead).")] = False,
    anthropic_upstream: Annotated[str | None, typer.Option("--anthropic-upstream", help="Where /v1/messages goes (https://api.anthropic.com); default --upstream.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Gateway processes on one port (default 1).")] = None,
    cache_url: Annotated[str | None, typer.Option("--cache-url", help="redis://HOST:PORT/DB: one rewrite cache for every worker and replica.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8080,
) -> None:
    """An OpenAI- and Anthropic-compatible gateway: BPO rewrites each prompt, then the request goes upstream."""
    overrides = {"upstream": upstream, "optimizer": optimizer, "optimizer_base_url": optimizer_base_url,
                 "rewrite_timeout_s": rewrite_timeout, "anthropic_upstream": anthropic_upstream, "workers": workers,
                 "cache_url": cache_url}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    build_gateway_app = _server_module("gateway").build_gateway_app
    server_workers = _server_module("workers")
    path = None if config is None else str(config)
    with usage_errors():  # a bad setting, flag or config file
        settings = server_workers.settings_from(path, overrides, no_rewrite)
    what = "relaying" if not settings.rewrites_anything else f"rewriting with {settings.optimizer}"
    what = f"proxy to {settings.upstream}, {what}"
    if settings.workers > 1:
        def announce(bound: int) -> None:
            typer.echo(f"{what}, {settings.workers} workers, at http://{host}:{bound}/v1 (Ctrl-C to stop)", err=True)

        try:
            server_workers.run_workers(path, overrides, no_rewrite, host, port, announce)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        return
    _run_server(build_gateway_app(settings), host, port, what, drain_s=settings.drain_timeout_s)


def _server_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"bpo_plugins.server.{name}")
    except ImportError as exc:
        raise UsageError(f"the servers need the server extra ({exc.name} is missing): pip install 'bpo-plugins[server]'") from None


def _run_server(asgi_app: Any, host: str, port: int, what: str, drain_s: float = 5, page: bool = False) -> None:
    from bpo_plugins.server import serve_announced

    def announce(bound: int) -> None:  # one line a supervisor or test can read: where to point OpenAI clients
        playground = f", the playground at http://{host}:{bound}/" if page else ""
        typer.echo(f"{what} at http://{host}:{bound}/v1{playground} (Ctrl-C to stop)", err=True)

    try:
        serve_announced(asgi_app, host, port, announce, drain_s=drain_s)
    except OSError as exc:  # the port is taken, or the host cannot be bound
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@app.command()
def models() -> None:
    """List the named optimizers this package can load offline."""
    from bpo_plugins.registry import DEFAULT_MODEL, REGISTRY

    for name in REGISTRY:
        typer.echo(f"{name}{' (default)' if name == DEFAULT_MODEL else ''}")


from bpo_plugins.drpo.cli import drpo_app  # noqa: E402  (typer only; heavy imports are lazy)
from bpo_plugins.export.cli import export_app  # noqa: E402
from bpo_plugins.training.cli import data_app, evaluate, train  # noqa: E402

app.add_typer(export_app, name="export")
app.add_typer(drpo_app, name="drpo")

app.add_typer(data_app, name="data")
app.command()(train)
app.command("eval")(evaluate)


def main() -> None:
    """Entry point, never a traceback. Bad input (a flag, a setting, a file, a model that will not load):
    one line, exit 2. Work that ran and failed: one line, exit 1. Anything else is a bug: one line that
    says so, exit 1; with ``BPO_DEBUG=1`` it raises, traceback and all."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("bpo_plugins").addHandler(handler)
    try:
        code = app(standalone_mode=False)
    except (UsageError, FileNotFoundError, ModelLoadError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
    except (RewriteError, ParityError, DRPOError) as exc:  # the work ran and failed: exit 1
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        # Usage errors from the command-line parser (typer vendors its own click): they know
        # how to print themselves and their exit code (2).
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            raise SystemExit(exit_code) from None
        if type(exc).__name__ == "Abort":
            raise SystemExit(1) from None
        if os.environ.get("BPO_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(exc).split())
        typer.secho(f"internal error: {type(exc).__name__}{': ' + message if message else ''} (set BPO_DEBUG=1 for the traceback)",
                    err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()

"""How the quantization block size and method trade decode speed for fidelity, on bpo-small's GenAI export
(4-bit by default, ``--precision int8`` for 8-bit).

Smaller blocks keep more scales (more bytes to read per token, more dequantization work). Larger
blocks round more weights to one scale. For each block size this prints:

- the decode speed next to llama.cpp on the same prompts, with the runtimes taking turns;
- fidelity to the fp32 export, teacher-forced: along fp32's own greedy continuation of each
  held-out prompt, the share of steps where the int4 model picks the same next token, and the mean
  KL divergence of its next-token distribution from fp32's.

`bpo_plugins.onnx_export.BLOCK_SIZE` holds the block size picked from these figures.

    python benchmarks/int4_block_size.py --blocks 32 64 128 256 --out benchmarks/results/int4_block_size
    python benchmarks/int4_block_size.py --blocks 64 --algos default rtn_last hqq --out benchmarks/results/int4_methods
    python benchmarks/int4_block_size.py --precision int8 --blocks 32 64 128 --out benchmarks/results/int8_block_size

Methods are the GenAI builder's (``rtn_last``: the LM head in int8; its k-quant methods fail on
SmolLM2's 576-wide layers) and ``hqq`` (onnxruntime's data-free HQQ quantizer on the fp32 graph).
llama.cpp is timed when llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from decode_speed import TOKENS, genai_runner, interleave, llama_cpp_runner
from runtimes import export_folder

from bpo_plugins.onnx_export import _genai_runner

FIDELITY_STEPS = 48


def forced_logits(folder: Path, prompts: list[list[int]], forced: list[list[int]]) -> list:
    """Per prompt, the export's next-token logits at each step along ``forced`` (export parity's teacher forcing)."""
    run = _genai_runner(folder, "cpu")
    return [run(ids, tokens)[0] for ids, tokens in zip(prompts, forced)]


def fidelity(reference, candidate) -> dict[str, float]:
    import numpy as np

    agree, kl = [], []
    for ref_trace, cand_trace in zip(reference, candidate):
        for ref, cand in zip(ref_trace, cand_trace):
            agree.append(ref.argmax() == cand.argmax())
            p = np.exp(ref - ref.max())
            p /= p.sum()
            log_q = cand - cand.max() - np.log(np.exp(cand - cand.max()).sum())
            kl.append(float((p * (np.log(p + 1e-12) - log_q)).sum()))
    return {"top1_agreement": round(float(np.mean(agree)), 4), "mean_kl": round(float(np.mean(kl)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--algos", nargs="+", default=["default"], help="int4 methods (export --int4-algo).")
    parser.add_argument("--precision", choices=["int4", "int8"], default="int4")
    parser.add_argument("--speed-prompts", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--fidelity-prompts", type=Path, default=Path("training/results/bpo-small-val_pairs.jsonl"))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_block_size"))
    args = parser.parse_args()

    from bpo_plugins.backends.onnx import load_export
    from bpo_plugins.inputs import read_prompt_rows, row_prompt
    from bpo_plugins.registry import find_smollm2_gguf

    fp32 = export_folder("bpo-small", "genai", "fp32")
    algos = args.algos if args.precision == "int4" else ["default"]
    exports = {(block, algo): export_folder("bpo-small", "genai", args.precision, block, algo) for block in args.blocks for algo in algos}
    backend = load_export(fp32)

    def encode(path: Path, limit: int | None) -> list[list[int]]:
        rows = read_prompt_rows(path)[:limit]
        return [backend.tokenizer(backend.render(row_prompt(r), backend.default_template), add_special_tokens=False)["input_ids"]
                for r in rows]

    def label(block: int, algo: str) -> str:
        return f"genai {args.precision} block {block}" + ("" if algo == "default" else f" {algo}")

    runners = {label(*key): genai_runner(folder) for key, folder in exports.items()}
    try:
        runners["llama.cpp"] = llama_cpp_runner(find_smollm2_gguf(), backend.tokenizer.eos_token_id)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp column", flush=True)
    times = interleave(runners, encode(args.speed_prompts, args.limit), args.rounds)
    tok_s = {name: (TOKENS - 1) * len(decode) / sum(decode) for name, (_, decode) in times.items()}
    llama = tok_s.get("llama.cpp")

    fidelity_prompts = encode(args.fidelity_prompts, None)
    fp32_run = _genai_runner(fp32, "cpu")
    # fp32's own greedy continuation of each prompt (the runner's free-running output), then every export along it.
    forced = [fp32_run(ids, [0] * FIDELITY_STEPS)[1] for ids in fidelity_prompts]
    reference = forced_logits(fp32, fidelity_prompts, forced)
    rows = []
    for (block, algo), folder in exports.items():
        name = label(block, algo)
        rows.append({"block_size": block, "method": algo, "decode_tok_s": round(tok_s[name], 1),
                     "x_llama_cpp": round(tok_s[name] / llama, 2) if llama else None,
                     **fidelity(reference, forced_logits(folder, fidelity_prompts, forced))})
        print(json.dumps(rows[-1]), flush=True)
    lines = [(f"llama.cpp (base Q4_1 GGUF): {llama:.1f} tok/s in the same interleaved run. " if llama else "") +
             f"Fidelity: {len(fidelity_prompts)} held-out prompts x up to {FIDELITY_STEPS} teacher-forced steps against the GenAI fp32 export.", "",
             "| block size | method | decode tok/s | x llama.cpp | top-1 agreement with fp32 | mean KL to fp32 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['block_size']} | {r['method']} | {r['decode_tok_s']} | {r['x_llama_cpp'] or '-'} | {r['top1_agreement']:.1%} | {r['mean_kl']} |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"llama_cpp_tok_s": llama and round(llama, 1), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""training/: data construction over real HTTP, real SFT steps on a tiny model, eval end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bpo_plugins.training.build import (
    bleu,
    build,
    dedupe,
    diversity_filter,
    filter_reason,
    parse_teacher,
    teacher_prompt,
)
from bpo_plugins.training.data import Pair, Triplet, read_pairs, read_triplets
from tests.conftest import shared_data
from tests.support.processes import scripted_server

# --- readers -----------------------------------------------------------------------------------


def test_read_pairs_bpo_layouts(tmp_path: Path):
    pairs = read_pairs([shared_data("bpo", "bpo_val.json")])
    assert len(pairs) == 300 and pairs[0].optimized
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"prompt": "c", "optimized_prompt": "d"}) + "\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [{"prompt": "e", "optimized_prompt": "f"}]}))
    assert [(p.prompt, p.optimized) for p in read_pairs([jsonl, split])] == [("a", "b"), ("c", "d"), ("e", "f")]


def test_eval_sets_are_excluded(tmp_path: Path):
    vicuna = shared_data("bpo", "vicuna_eval.jsonl")
    first = json.loads(vicuna.read_text().splitlines()[0])["text"]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": first, "optimized_prompt": "x y"}) + "\n" + json.dumps({"prompt": "keep me", "optimized_prompt": "ok"}) + "\n")
    assert [p.prompt for p in read_pairs([data], exclude=[vicuna])] == ["keep me"]


def test_read_triplets_all_formats(tmp_path: Path):
    hh = read_triplets(shared_data("preference", "hh_rlhf_harmless_base_test.jsonl.gz"))
    assert len(hh) > 500 and all(t.prompt and t.chosen != t.rejected for t in hh)
    assert "\n\nHuman:" not in hh[0].prompt and "Assistant:" not in hh[0].chosen
    generic = tmp_path / "g.jsonl"
    generic.write_text(json.dumps({"prompt": "p", "context": "c", "chosen": "good", "rejected": "bad"}) + "\n")
    assert read_triplets(generic) == [Triplet("p", "good", "bad", "c", "g.jsonl")]
    assert len(read_triplets(shared_data("bpo", "bpo_val.json"))) == 300


# --- parser and filters on hostile teacher output ----------------------------------------------


@pytest.mark.parametrize(
    ("output", "parsed"),
    [
        ("Comparison...\nOptimized Instruction: Explain gravity simply. [END]", "Explain gravity simply."),
        ("optimised instruction:  \"Explain gravity.\"  [END] trailing", "Explain gravity."),
        ("Optimized Instruction: draft [END]\nOptimized Instruction: final one [END]", "final one"),
        ("Optimized Instruction: no end marker at all", "no end marker at all"),
        ("I refuse.", None),
        ("Optimized Instruction: [END]", None),
        ("", None),
    ],
)
def test_parse_teacher(output, parsed):
    assert parse_teacher(output) == parsed


@pytest.mark.parametrize(
    ("original", "optimized", "reason"),
    [
        ("Explain how vaccines train the immune system.", "Explain vaccines.", "length_ratio"),
        ("Explain gravity.", "Explain gravity " + "in great depth with many worked examples " * 3, "length_ratio"),
        ("Explain gravity to me.", "Explain gravity to me [PROTECTED] please.", "leftover_marker"),
        ("What is the capital of France?", "The capital of France is Paris, a city on the Seine.", "answered"),
        ("Explain gravity to me.", "Explain gravity to a curious teenager, with one everyday example.", None),
    ],
)
def test_filter_reason(original, optimized, reason):
    assert filter_reason(original, optimized) == reason


def test_dedupe_and_diversity():
    pairs = [
        Pair("Write a poem about the sea", "a"),
        Pair("write a poem about the  sea", "b"),  # exact after normalising
        Pair("Write a poem about the sea today", "c"),  # near duplicate
        Pair("Summarise this news article", "d"),
    ]
    kept, exact, near = dedupe(pairs, threshold=0.6)
    assert [p.prompt for p in kept] == ["Write a poem about the sea", "Summarise this news article"] and (exact, near) == (1, 1)
    templated = [Pair(f"q{i}", "Please answer the following question in detail with examples and sources.") for i in range(5)]
    varied = [Pair("x", "Compose a sonnet about autumn leaves."), Pair("y", "List three causes of inflation in 2022.")]
    kept, dropped = diversity_filter(templated + varied, max_self_bleu=0.6)
    assert dropped == 5 and {p.prompt for p in kept} == {"x", "y"}
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) > 0.9 > bleu("a b c", ["x y z"])


def test_teacher_prompt_with_and_without_context():
    plain = teacher_prompt(Triplet("Explain {braces} please", "good", "bad"))
    assert "Explain {braces} please" in plain and "[Context]" not in plain and "Optimized Instruction:" in plain
    with_context = teacher_prompt(Triplet("Who owns it?", "good", "bad", context="The club is owned by four investors."))
    assert "[Context]\nThe club is owned by four investors." in with_context and "do not change the context" in with_context


# --- data construction end to end against a real OpenAI-compatible server process ---------------

TEACHER_SCRIPT = {
    "Explain gravity": "The better response is concrete.\nOptimized Instruction: Explain gravity to a curious teenager, with one everyday example. [END]",
    "Name a fruit": "Optimized Instruction: The fruit is an apple, which is red. [END]",
    "Tell a story": "I cannot do that.",
    "Describe rain": "__error__:500",
    "Describe snow": "Optimized Instruction: Describe snow: how it forms, and why no two flakes look alike. [END]",
}


@pytest.fixture(scope="module")
def teacher_server(tmp_path_factory):
    yield from scripted_server(tmp_path_factory.mktemp("teacher"), TEACHER_SCRIPT)


def test_data_build_end_to_end_and_resume(teacher_server, tmp_path: Path):
    from bpo_plugins.backends.openai import OpenAIBackend

    triplets = [Triplet(p, "good answer", "bad answer") for p in ("Explain gravity", "Name a fruit", "Tell a story", "Describe rain", "Describe snow", "Explain gravity")]
    out = tmp_path / "pairs.jsonl"
    teacher = OpenAIBackend("script-teacher", base_url=teacher_server.base_url, max_retries=0)
    report = build(triplets[:3], teacher, out, concurrency=2, retries=1)
    assert report.generated == 3
    report = build(triplets, teacher, out, concurrency=2, retries=1)  # resumes: only the new prompts are asked
    assert report.resumed == 3 and report.generated == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Explain gravity", "Describe snow"]
    assert rows[0]["optimized_prompt"].startswith("Explain gravity to a curious teenager") and rows[0]["good_res"] == "good answer"
    assert report.dropped == {"answered": 1, "unparsed": 1, "teacher_error": 1, "exact_duplicate": 1}
    assert json.loads(out.with_suffix(".report.json").read_text())["kept"] == 2


# --- SFT on a tiny model ----------------------------------------------------------------------


def _tiny_pairs(tmp_path: Path) -> Path:
    rows = json.loads(shared_data("bpo", "bpo_val.json").read_text())[:16]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def test_full_finetune_steps_change_weights_and_lower_loss(tiny_bpo_dir, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from bpo_plugins.training.sft import TrainConfig, train

    figures = train(TrainConfig(
        data=[str(_tiny_pairs(tmp_path))], base_model=str(tiny_bpo_dir), out=str(tmp_path / "run"), lora=False,
        max_steps=12, learning_rate=3e-3, batch_size=4, val_fraction=0.25, max_length=128, epochs=1,
    ))
    losses = [row["loss"] for row in figures["log_history"] if "loss" in row]
    assert losses[-1] < losses[0]
    before = AutoModelForCausalLM.from_pretrained(tiny_bpo_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Loss on the optimized-prompt tokens only" in card and str(figures["train_loss"]) in card
    assert len((tmp_path / "run" / "val_pairs.jsonl").read_text().splitlines()) == 4


def test_lora_adapter_loads_into_a_rewriter(tiny_bpo_dir, tmp_path: Path):
    from bpo_plugins import Rewriter
    from bpo_plugins.training.sft import TrainConfig, train

    with warnings.catch_warnings(record=True) as caught:  # peft on transformers 5 warns unless we quiet it
        warnings.simplefilter("always")
        train(TrainConfig(data=[str(_tiny_pairs(tmp_path))], base_model=str(tiny_bpo_dir), out=str(tmp_path / "lora"),
                          max_steps=2, batch_size=4, max_length=96))
        rewriter = Rewriter.from_pretrained(tiny_bpo_dir, adapter=tmp_path / "lora", max_new_tokens=4)
        result = rewriter.rewrite("Explain gravity")
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert rewriter.backend.revision.count("local-") == 2  # the adapter is part of the cache identity
    assert result.candidates


def test_save_steps_checkpoints_every_n_steps_and_a_resume_takes_the_latest_step(tiny_bpo_dir, tmp_path: Path):
    """A long run checkpoints mid-epoch (``save_steps``), and resuming picks the checkpoint of the highest step:
    checkpoint-10, not checkpoint-9, which sorts after it as text (here an empty folder that cannot be resumed)."""
    import dataclasses

    from bpo_plugins.training.sft import TrainConfig, train

    config = TrainConfig(data=[str(_tiny_pairs(tmp_path))], base_model=str(tiny_bpo_dir), out=str(tmp_path / "run"),
                         max_steps=10, save_steps=5, batch_size=4, max_length=96)
    train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-10"]
    assert json.loads((checkpoints / "checkpoint-10" / "trainer_state.json").read_text())["save_steps"] == 5
    (checkpoints / "checkpoint-9").mkdir()
    assert train(dataclasses.replace(config, max_steps=12))["steps"] == 12


def test_train_cli_sets_the_lora_rank(tiny_bpo_dir, tmp_path: Path):
    out = tmp_path / "cli-lora"
    run = subprocess.run([sys.executable, "-m", "bpo_plugins", "train", "--data", str(_tiny_pairs(tmp_path)), "--base-model",
                          str(tiny_bpo_dir), "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--lora-r", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    figures = run.stdout[run.stdout.rindex('{\n  "'):]  # the Trainer prints its own log dicts before the figures
    assert json.loads(figures)["steps"] == 1


def test_loss_masks_the_instruction(tiny_bpo_dir):
    from transformers import AutoTokenizer

    from bpo_plugins.templates import BPO
    from bpo_plugins.training.sft import encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_bpo_dir)
    row = encode(Pair("Tell me about cats", "Describe cats: their history and care."), tokenizer, BPO, 256)
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(learned, skip_special_tokens=True).strip() == "Describe cats: their history and care."
    assert row["labels"][-1] == tokenizer.eos_token_id


# --- eval end to end ---------------------------------------------------------------------------


def test_eval_end_to_end_with_local_target_and_judge(tiny_bpo_dir, model_server, teacher_server, tmp_path: Path):
    from bpo_plugins.pairwise import verdict

    assert verdict("... so [[B]]") == "B" and verdict("no verdict") == "C"
    sets = tmp_path / "mini_eval.jsonl"
    sets.write_text("".join(json.dumps({"prompt": p, "optimized_prompt": p + " in detail"}) + "\n" for p in ("Explain gravity", "Describe snow")))
    out = tmp_path / "eval"
    args = [
        sys.executable, "-m", "bpo_plugins", "eval", str(sets), "--out", str(out), "--model", str(tiny_bpo_dir),
        "--max-new-tokens", "6", "--target-model", "smollm2", "--target-base-url", model_server.base_url,
        "--judge-model", "smollm2", "--judge-base-url", model_server.base_url,  # pair-v2 from the packaged judge prompts
    ]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    proxy = next(iter(report["proxy"].values()))
    assert proxy["n"] == 2 and 0 <= proxy["fallback_rate"] <= 1 and proxy["raw_prompt_reference_cosine"] > 0.5
    judged = report["judge"][0]
    assert judged["n"] == 2 and judged["win"] + judged["tie"] + judged["lose"] == pytest.approx(100)
    assert (out / "eval_plot.png").stat().st_size > 1000 and "| set |" in (out / "eval_report.md").read_text()
    calls = len((out / "calls.jsonl").read_text().splitlines())
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)  # resumes from the call cache
    assert rerun.returncode == 0 and len((out / "calls.jsonl").read_text().splitlines()) == calls


def test_two_process_training_under_accelerate_launch(tiny_bpo_dir, tmp_path: Path):
    """`bpo train` unchanged under `accelerate launch`: 2 CPU processes (gloo), weights in step, one checkpoint."""
    import subprocess
    import sys

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": [str(_tiny_pairs(tmp_path))], "base_model": str(tiny_bpo_dir), "out": str(tmp_path / "ddp"),
                                  "lora": False, "max_steps": 15, "learning_rate": 3e-3, "batch_size": 2, "val_fraction": 0.25,
                                  "max_length": 128, "epochs": 1}))
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bpo_plugins.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "ddp" / "train_figures.json").read_text())
    assert figures["world_size"] == 2
    first, second = figures["param_checksum_by_rank"]
    assert first == second  # DDP kept both ranks' weights identical
    losses = [row["loss"] for row in figures["log_history"] if "loss" in row]
    assert losses[-1] < losses[0]
    assert len(list((tmp_path / "ddp").glob("*.safetensors"))) == 1 and (tmp_path / "ddp" / "README.md").is_file()


def test_every_resuming_writer_cuts_a_torn_last_line_before_it_appends(tmp_path: Path):
    """Issue 28: self-play's rows and the evaluation and score caches appended after a half-written line,
    so the first new row was glued to the fragment and lost on the next resume. One rule (inputs.resume_jsonl)."""
    from bpo_plugins.training.evaluate import CallCache
    from bpo_plugins.training.scores import ScoreCache
    from bpo_plugins.training.selfplay import _done_rows

    def torn(name: str, row: dict) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:9], encoding="utf-8")  # killed mid-write
        return path

    scores = torn("scores.jsonl", {"key": "a", "value": 1.0})
    ScoreCache(scores).put_many({"b": 2.0})
    assert ScoreCache(scores).values == {"a": 1.0, "b": 2.0}
    calls = torn("calls.jsonl", {"key": "a", "value": "first"})
    CallCache(calls).get_or_call(["b"], lambda: "second")
    assert len(CallCache(calls).values) == 2
    row = {"key": "a", "prompt": "p", "raw_score": 0.0, "candidates": [{"text": "q", "guard": None, "score": 1.0}]}
    pairs = torn("pairs.jsonl", row)
    assert list(_done_rows(pairs, 0.5)) == ["a"]
    with pairs.open("a", encoding="utf-8") as sink:  # what run_round_data does next
        sink.write(json.dumps({**row, "key": "b"}) + "\n")
    assert list(_done_rows(pairs, 0.5)) == ["a", "b"] and _done_rows(pairs, 0.5)["b"]["selected"] == "q"

"""bpo data selfplay: the likelihood proxy against a hand computation, guard-failing candidates never
kept, and the whole loop (candidates, scores, selection, one SFT step, held-out figures, resume) on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpo_plugins.inputs import UsageError
from bpo_plugins.training.scores import RAW_TARGET, LikelihoodScorer, ScoreCache, answer_margins, win_tie_loss
from bpo_plugins.training.selfplay import (
    Item,
    SelfplayConfig,
    heldout_split,
    load_round_optimizer,
    preference_pairs,
    round_prompts,
    run,
    run_round_data,
    select,
    selection_fields,
)
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def tiny_lm(tiny_bpo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_bpo_dir).eval(), AutoTokenizer.from_pretrained(tiny_bpo_dir)


def _hand_mean_logprob(model, prefix_ids: list[int], response_ids: list[int]) -> float:
    import torch

    ids = torch.tensor([prefix_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    values = [float(logprobs[len(prefix_ids) - 1 + i, token]) for i, token in enumerate(response_ids)]
    return sum(values) / len(values)


def test_likelihood_preference_equals_a_hand_computation(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, good, bad = "Explain gravity to a child.", "Gravity is a pull between things that have mass.", "No."
    scorer = LikelihoodScorer(model, tokenizer)
    assert scorer.template == RAW_TARGET  # no chat template: prompt, line break, response
    prefix = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
    assert prefix[0] == tokenizer.bos_token_id
    expected = [_hand_mean_logprob(model, prefix, tokenizer(r, add_special_tokens=False)["input_ids"]) for r in (good, bad)]
    assert scorer.mean_logprobs([(prompt, good), (prompt, bad)]) == pytest.approx(expected, abs=1e-5)
    assert scorer.preferences([(prompt, good, bad)]) == pytest.approx([expected[0] - expected[1]], abs=1e-5)
    # Batched with longer and shorter rows (right padding), every score is the one of its row alone.
    rows = [(prompt, good), ("Name three rivers in Europe and say where each one flows into the sea.", good), ("Hi", bad)]
    alone = [LikelihoodScorer(model, tokenizer, batch_size=1).mean_logprobs([row])[0] for row in rows]
    assert LikelihoodScorer(model, tokenizer, batch_size=8).mean_logprobs(rows) == pytest.approx(alone, abs=1e-5)


def test_likelihood_in_the_targets_chat_template(tiny_lm, bundled_folder, tmp_path: Path):
    from transformers import AutoTokenizer

    model, tokenizer = tiny_lm
    chat = AutoTokenizer.from_pretrained(tiny_lm[1].name_or_path)
    chat.chat_template = AutoTokenizer.from_pretrained(bundled_folder).chat_template  # SmolLM2's template
    scorer = LikelihoodScorer(model, chat, max_response_tokens=5, cache=ScoreCache(tmp_path / "scores.jsonl"))
    prompt, response = "What is 2 + 2?", "Two plus two is four, a small even number."
    text = chat.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    prefix = chat(text, add_special_tokens=False)["input_ids"]
    truncated = chat(response, add_special_tokens=False)["input_ids"][:5]
    assert scorer.mean_logprobs([(prompt, response)])[0] == pytest.approx(_hand_mean_logprob(model, prefix, truncated), abs=1e-5)
    # Cached on disk: a new scorer over the same file returns the value without the model.
    again = LikelihoodScorer(None, chat, max_response_tokens=5, cache=ScoreCache(tmp_path / "scores.jsonl"))
    assert again.mean_logprobs([(prompt, response)]) == scorer.mean_logprobs([(prompt, response)])


def test_answer_margin_and_win_tie_loss():
    from bpo_plugins.embeddings import shared_embedder

    good, bad = "Paris is the capital of France.", "I like turtles."
    margins = answer_margins(shared_embedder(), ["The capital of France is Paris.", "Turtles are nice, I like them.", ""], [good] * 3, [bad] * 3)
    assert margins[0] > 0.3 and margins[1] < -0.3 and margins[2] == 0.0
    figures = win_tie_loss([0.5, 0.105, 0.0], [0.1, 0.1, 0.1], band=0.01)
    assert (figures["win"], figures["tie"], figures["loss"], figures["net"]) == (1, 1, 1, 0)


def test_heldout_split_is_fixed_and_contains_the_shipped_held_out_pairs():
    train, held = heldout_split(shared_data("bpo", "bpo_val.json"))
    assert (len(train), len(held)) == (240, 60)
    shipped = [json.loads(line)["prompt"] for line in Path("training/results/bpo-small-val_pairs.jsonl").read_text().splitlines()]
    assert set(shipped) <= {p.prompt for p in held} and not {p.prompt for p in held} & {p.prompt for p in train}
    assert [p.prompt for p in heldout_split(shared_data("bpo", "bpo_val.json"))[1]] == [p.prompt for p in held]


def _tiny_config(tiny_bpo_dir: Path, out: Path, bpo: Path, **changes) -> SelfplayConfig:
    settings = dict(
        out=str(out), bpo=str(bpo), hh=str(shared_data("preference", "hh_rlhf_harmless_base_test.jsonl.gz")), exclude=[],
        rounds=1, prompts=3, num_candidates=3, base_model=str(tiny_bpo_dir), start_adapter=None, runtime="transformers",
        target=str(tiny_bpo_dir), heldout_limit=2, max_new_tokens=8, response_tokens=16, answer_tokens=4, score_batch=4,
        train={"batch_size": 4, "max_length": 96, "lora_r": 4, "lora_alpha": 8, "keep_as_is_fraction": 0.1},
    )
    return SelfplayConfig(**{**settings, **changes})


def test_guard_failing_candidates_are_never_selected(tiny_bpo_dir, tiny_lm, tmp_path: Path):
    model, tokenizer = tiny_lm
    config = _tiny_config(tiny_bpo_dir, tmp_path, shared_data("bpo", "bpo_val.json"))
    rewriter = load_round_optimizer(config, None)
    prompt = "Is 37 bigger than 73? Explain the comparison of the two numbers step by step."
    item = Item(prompt, "73 is bigger: compare the tens digits, 7 tens against 3 tens.", "37 is bigger.")
    failing = [
        "Sure! 73 is bigger than 37 because seven tens beat three tens.",  # answered
        "Is one bigger than the other? Explain the comparison of the two numbers step by step.",  # numbers lost
        "Is 37 bigger than 73?",  # length ratio
        "Is 37 bigger than 73? " + "step by step " * 30,  # degenerate
    ]
    passing = [
        "Is 37 bigger than 73? Explain, step by step, the comparison of the two numbers and name the larger one.",
        "Is 37 bigger than 73? Explain the comparison of these two numbers step by step for a student.",
        "Is 37 bigger than 73? Compare the two numbers step by step and explain which one is larger.",
        "Is 37 bigger than 73? Explain the comparison of the two numbers step by step, with the tens digits first.",
    ]
    verdicts = rewriter.check([prompt] * 8, [[c] for c in failing + passing], mode="aggressive")
    assert [v.fallback is None for v in verdicts] == [False] * 4 + [True] * 4  # the core guards decide, not this test
    scorer = LikelihoodScorer(model, tokenizer)
    scores = dict(zip(failing + passing, scorer.preferences([(c, item.chosen, item.rejected) for c in failing + passing])))
    best_failing = max(failing, key=scores.get)
    below = [c for c in passing if scores[c] < scores[best_failing]]
    assert below  # the precondition: the best-scoring candidate of the offer fails a guard
    chosen = select(item, failing + below, rewriter, scorer)
    kept = selection_fields(prompt, chosen.raw_score, chosen.candidates, margin=-10.0)  # any passing candidate beats raw
    assert kept["selected"] in below and kept["selected"] != best_failing and kept["changed"]
    assert all(row["score"] is None for row in chosen.candidates if row["guard"] is not None)
    assert {row["guard"] for row in chosen.candidates if row["text"] in failing} >= {"answered", "numbers_lost"}
    nothing = select(item, failing, rewriter, scorer)
    kept = selection_fields(prompt, nothing.raw_score, nothing.candidates, margin=-10.0)
    assert kept["selected"] == prompt and not kept["changed"]  # nothing passes: the raw prompt


def test_selfplay_loop_end_to_end_then_resumes(tiny_bpo_dir, tmp_path: Path):
    bpo = tmp_path / "bpo.json"
    bpo.write_text(json.dumps(json.loads(shared_data("bpo", "bpo_val.json").read_text())[:20]))
    dolly = tmp_path / "dolly.json"
    dolly.write_text(json.dumps([{"instruction": "Summarise the passage in one line.", "context": "Rivers carry water to the sea.",
                                  "response": "Rivers flow into the sea.", "category": "summarization"}]))
    config = _tiny_config(tiny_bpo_dir, tmp_path / "run", bpo, references=[str(dolly)])
    report = run(config, train_overrides={"max_steps": 1})
    rows = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["source"] for r in rows} == {"bpo", "hh-rlhf", "dolly.json"}  # one per source in turn
    dolly_row = next(r for r in rows if r["source"] == "dolly.json")
    assert dolly_row["bad_res"] and dolly_row["good_res"] == "Rivers flow into the sea."  # the target's raw answer is rejected
    for row in rows:
        assert isinstance(row["raw_score"], float)
        passing = [c for c in row["candidates"] if c["guard"] is None]
        assert all(isinstance(c["score"], float) for c in passing)
        assert row["selected"] == row["prompt"] or row["selected"] in [c["text"] for c in passing]
        if row["changed"]:
            assert row["delta"] > config.margin
    held_prompts = {p.prompt for p in heldout_split(bpo)[1]}
    assert not held_prompts & {r["prompt"] for r in rows}
    round_one = report["rounds"][0]
    assert round_one["train"]["steps"] == 1 and (tmp_path / "run" / "round-1" / "adapter" / "adapter_config.json").is_file()
    trained = (tmp_path / "run" / "round-1" / "train.jsonl").read_text().splitlines()
    assert len(trained) == 16 + 3  # the BPO training pairs (20 less 4 held out) and the round's pairs
    held = round_one["heldout"]
    assert held["n"] == 2 and held["likelihood"]["win"] + held["likelihood"]["tie"] + held["likelihood"]["loss"] == 2
    assert {"answer_margin", "reference_cosine", "changed_share", "meaning_drift", "answered_rate", "answer_words_change"} <= set(held)
    assert report["baselines"]["reference"]["reference_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert "| round 1 |" in (tmp_path / "run" / "selfplay.md").read_text()
    assert json.loads((tmp_path / "run" / "round-1" / "figures.json").read_text())["data"]["generated"] == 3

    again = run(config, train_overrides={"max_steps": 1})  # resumes: every prompt done, the adapter trained
    assert again["rounds"][0]["data"]["resumed"] == 3 and again["rounds"][0]["data"]["generated"] == 0
    assert len((tmp_path / "run" / "round-1" / "pairs.jsonl").read_text().splitlines()) == 3
    assert again["rounds"][0]["heldout"]["likelihood"] == held["likelihood"]
    # A selection that differs from the one the round's adapter was trained on (another --margin) is
    # refused, not silently served by the old adapter; the same selection reuses it.
    from bpo_plugins.training.selfplay import load_pool, train_round

    train_pairs = load_pool(config)[2]
    moved = [{**rows[0], "selected": rows[0]["prompt"] + " Explain it step by step."}, *rows[1:]]
    with pytest.raises(UsageError, match="trained on another selection"):
        train_round(config, tmp_path / "run" / "round-1", moved, train_pairs)
    assert train_round(config, tmp_path / "run" / "round-1", rows, train_pairs) == again["rounds"][0]["train"]

    # --rounds 0 scores an adapter trained elsewhere: the baselines only, its figures those of the round it came from.
    adapter = str(tmp_path / "run" / "round-1" / "adapter")
    scored = run(dataclasses.replace(config, out=str(tmp_path / "score"), rounds=0, start_adapter=adapter))
    assert scored["rounds"] == [] and not (tmp_path / "score" / "round-1").exists()
    assert scored["baselines"]["raw"] == report["baselines"]["raw"]
    assert scored["baselines"]["start"]["likelihood"] == held["likelihood"]
    assert "| start (" in (tmp_path / "score" / "selfplay.md").read_text()

    # DPO instead of SFT: from round 1's adapter (a frozen copy of it the reference), on its prompts' best/worst versions.
    from safetensors.torch import load_file

    dpo, scored_rows = _dpo_from_round_one(config, tmp_path / "run", tmp_path / "dpo")
    trained = dpo["rounds"][0]
    assert trained["method"] == "dpo" and trained["data"]["generated"] == 0  # the round's scored prompts, not drawn again
    pairs = [json.loads(line) for line in (tmp_path / "dpo" / "round-1" / "preference.jsonl").read_text().splitlines()]
    assert pairs == preference_pairs(scored_rows, 0.0) and len(pairs) == 3
    assert all(p["chosen"].endswith("Explain each step.") and p["rejected"].endswith("Be brief.") for p in pairs)
    assert trained["train"]["pairs"] == 3 and trained["train"]["steps"] == 2
    assert trained["train"]["start"] == adapter
    saved = tmp_path / "dpo" / "round-1" / "adapter"
    assert not (saved / "ref").exists()  # only the trained adapter, not TRL's frozen reference copy
    before, after = load_file(Path(adapter) / "adapter_model.safetensors"), load_file(saved / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)
    assert {"likelihood", "answer_margin", "meaning_drift"} <= set(trained["heldout"])
    assert "DPO on" in (tmp_path / "dpo" / "selfplay.md").read_text()
    assert run(dataclasses.replace(config, out=str(tmp_path / "dpo"), method="dpo", pair_margin=0.0, start_adapter=adapter),
               train_overrides={"max_steps": 2})["rounds"][0]["train"] == trained["train"]  # resumes: trained once


def test_fixed_versions_score_texts_on_the_held_out_split(tiny_bpo_dir, tmp_path: Path):
    from bpo_plugins.training.selfplay import fixed_versions

    bpo = tmp_path / "bpo.json"
    bpo.write_text(json.dumps(json.loads(shared_data("bpo", "bpo_val.json").read_text())[:20]))
    config = _tiny_config(tiny_bpo_dir, tmp_path / "bounds", bpo)
    rows = fixed_versions(config, {"copy": lambda i: i.prompt, "reference": lambda i: i.reference or i.prompt,
                                   "suffix": lambda i: i.prompt + " Give one example."})
    assert [r["version"] for r in rows] == ["raw", "copy", "reference", "suffix"] and rows[0]["n"] == 2
    copy, reference, suffix = rows[1:]
    # The raw prompt again ties with itself on both proxies; the others are scored against it.
    assert copy["likelihood"]["tie"] == copy["answer_margin"]["tie"] == 2 and copy["changed_share"] == 0.0
    assert reference["reference_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert suffix["changed_share"] == 1.0 and suffix["likelihood"]["mean"] != rows[0]["likelihood"]["mean"]


def test_preference_pairs_take_the_best_and_worst_version_the_guards_passed():
    rows = [
        {"prompt": "p", "raw_score": 0.2, "candidates": [{"text": "a", "guard": None, "score": 0.5},
                                                         {"text": "b", "guard": "answered", "score": 0.9},  # never either end
                                                         {"text": "c", "guard": None, "score": 0.1}]},
        {"prompt": "q", "raw_score": 0.3, "candidates": [{"text": "d", "guard": None, "score": 0.33}]},  # a gap under the margin
        {"prompt": "r", "raw_score": 0.6, "candidates": [{"text": "e", "guard": None, "score": 0.2},
                                                         {"text": "f", "guard": "meaning_drift", "score": 0.0}]},
    ]
    pairs = preference_pairs(rows, 0.05)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p", "a", "c"), ("r", "r", "e")]  # the raw prompt can win
    assert pairs[0]["gap"] == pytest.approx(0.4)


@pytest.mark.parametrize("chat", [False, True], ids=["raw-inst", "chat-template"])
def test_dpo_sees_the_tokens_sft_and_inference_see(tiny_bpo_dir, bundled_folder, chat):
    """TRL tokenises plain text with the tokenizer's special tokens; the rows must still give SFT's ids (inference's)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from bpo_plugins.training.data import Pair
    from bpo_plugins.training.selfplay.train import preference_rows
    from bpo_plugins.training.sft import _pick_template, encode

    tokenizer = AutoTokenizer.from_pretrained(bundled_folder if chat else tiny_bpo_dir)
    template = _pick_template("auto", tokenizer)
    assert (template.raw is None) == chat
    pairs = [{"prompt": "Tell me about Harry Potter", "chosen": "Summarise the plot of Harry Potter and its main characters.",
              "rejected": "Tell me about Harry Potter."}]
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_bpo_dir), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(preference_rows(pairs, tokenizer, template)),
                         args=DPOConfig(output_dir="unused", report_to=[], use_cpu=True, max_length=None, activation_checkpointing=False))
    row = trainer.train_dataset[0]
    for version in ("chosen", "rejected"):
        sft = encode(Pair(pairs[0]["prompt"], pairs[0][version]), tokenizer, template, max_length=512)
        assert row["prompt_ids"] + row[f"{version}_ids"] == sft["input_ids"]
        assert len(row["prompt_ids"]) == sft["labels"].count(-100)  # the same split between instruction and rewrite


def test_dpo_reference_is_the_starting_adapter_and_training_resumes(tiny_bpo_dir, tmp_path: Path):
    """At step 1 the policy is the start; DPO's loss is exactly ln 2 only when the reference is the start too (the
    start's LoRA is non-zero, so the base model as reference would not give it). Then a cut run resumes."""
    import math

    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bpo_plugins.quiet import quiet_libraries
    from bpo_plugins.training.selfplay import dpo_round
    from bpo_plugins.training.sft import TrainConfig, lora_config

    torch.manual_seed(1)
    with quiet_libraries(("transformers",)):  # peft reads transformers 5's deprecated is_gradient_checkpointing
        start_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_bpo_dir), lora_config(TrainConfig(data=[], lora_r=4, lora_alpha=8)))
    with torch.no_grad():
        for name, param in start_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    start = tmp_path / "start"
    start_model.save_pretrained(start)
    config = _tiny_config(tiny_bpo_dir, tmp_path, shared_data("bpo", "bpo_val.json"))
    pairs = [{"prompt": f"Give me {n} tips for sleeping well", "chosen": f"Give me {n} practical tips for sleeping well, each with a reason.",
              "rejected": f"Give me {n} tips for sleeping well."} for n in ("two", "three", "four")]
    first = dpo_round(config, tmp_path / "round", pairs, start, max_steps=1, batch_size=4)
    assert first["train_loss"] == pytest.approx(math.log(2), abs=2e-4) and first["trained_pairs"] == 3
    fresh = dpo_round(config, tmp_path / "fresh", pairs, None, max_steps=1, batch_size=4)  # a new LoRA: the base is the start
    assert fresh["train_loss"] == pytest.approx(math.log(2), abs=2e-4) and fresh["start"] is None

    (tmp_path / "round" / "adapter" / "train_figures.json").unlink()  # as if cut after its first checkpoint
    assert (tmp_path / "round" / "adapter" / "checkpoints" / "checkpoint-1" / "ref").is_dir()
    resumed = dpo_round(config, tmp_path / "round", pairs, start, max_steps=2, batch_size=4)
    assert resumed["steps"] == 2
    assert any(entry.get("step") == 2 for entry in json.loads((tmp_path / "round" / "adapter" / "train_figures.json").read_text())["log_history"])
    before, after = load_file(start / "adapter_model.safetensors"), load_file(tmp_path / "round" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)
    with pytest.raises(UsageError, match="trained by dpo, not sft"):  # another method's adapter never stands in
        from bpo_plugins.training.selfplay import train_round

        train_round(config, tmp_path / "round", [], [])


def _dpo_from_round_one(config: SelfplayConfig, first_run: Path, out: Path) -> tuple[dict, list[dict]]:
    """A DPO round from the SFT round's adapter, resuming from round 1's scored prompts. The tiny random model's
    candidates all fail the guards, so each prompt gets two scored, guard-passing versions written in."""
    (out / "round-1").mkdir(parents=True)
    (out / "scores.jsonl").write_bytes((first_run / "scores.jsonl").read_bytes())
    rows = [json.loads(line) for line in (first_run / "round-1" / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        row["candidates"] += [{"text": row["prompt"] + " Explain each step.", "guard": None, "score": row["raw_score"] + 0.2},
                              {"text": row["prompt"] + " Be brief.", "guard": None, "score": row["raw_score"] - 0.2}]
    (out / "round-1" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo = dataclasses.replace(config, out=str(out), method="dpo", pair_margin=0.0, start_adapter=str(first_run / "round-1" / "adapter"))
    return run(dpo, train_overrides={"max_steps": 2}), rows  # step 1 is inside the warmup (learning rate 0)


def test_round_data_resumes_per_prompt(tiny_bpo_dir, tiny_lm, tmp_path: Path):
    from bpo_plugins.training.selfplay import load_pool

    model, tokenizer = tiny_lm
    config = _tiny_config(tiny_bpo_dir, tmp_path, shared_data("bpo", "bpo_val.json"), hh=None)
    pools, _, _ = load_pool(config)
    items = round_prompts(pools, 1, 3)
    rewriter = load_round_optimizer(config, None, num_candidates=2)
    scorer = LikelihoodScorer(model, tokenizer, max_response_tokens=16)
    out = tmp_path / "pairs.jsonl"
    first = run_round_data(items[:2], rewriter, scorer, None, out, margin=0.01, answer_tokens=4, cache=ScoreCache())
    second = run_round_data(items, rewriter, scorer, None, out, margin=0.01, answer_tokens=4, cache=ScoreCache())
    assert (first["generated"], second["resumed"], second["generated"], second["prompts"]) == (2, 2, 1, 3)
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [i.prompt for i in items]
    assert round_prompts(pools, 2, 3)[0] not in items  # the next round draws new prompts
    # Another --margin on resume selects again from the stored scores: nothing is drawn or scored.
    strict = run_round_data(items, None, None, None, out, margin=1e9, answer_tokens=4, cache=ScoreCache())
    assert (strict["generated"], strict["changed_share"], strict["mean_delta_kept"]) == (0, 0, None)
    loose = run_round_data(items, None, None, None, out, margin=-1e9, answer_tokens=4, cache=ScoreCache())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    passing = [max((c for c in r["candidates"] if c["guard"] is None), key=lambda c: c["score"], default=None) for r in rows]
    assert loose["changed_share"] == pytest.approx(sum(c is not None for c in passing) / 3)


def test_selfplay_cli_measures_cost(tiny_bpo_dir, tmp_path: Path):
    bpo = tmp_path / "bpo.json"
    bpo.write_text(json.dumps(json.loads(shared_data("bpo", "bpo_val.json").read_text())[:20]))
    run_ = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay", "--out", str(tmp_path / "m"), "--bpo", str(bpo),
                           "--base-model", str(tiny_bpo_dir), "--target", str(tiny_bpo_dir), "--start-adapter", "none",
                           "--runtime", "transformers", "-n", "2", "--measure", "2", "--response-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert run_.returncode == 0, run_.stderr[-2000:]
    cost = json.loads((tmp_path / "m" / "cost.json").read_text())
    assert cost["generated"] == 2 and cost["candidates_prompts_per_s"] > 0 and cost["scoring_prompts_per_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay", "--bpo", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and bad.stderr.count("\n") == 1


def test_preference_files_join_the_rounds_without_held_out_or_eval_prompts(tmp_path: Path):
    from bpo_plugins.training.selfplay import load_pool

    bpo = shared_data("bpo", "bpo_val.json")
    held_prompt = heldout_split(bpo)[1][0].prompt
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps([{"instruction": "Name three primary colours."}]))
    triples = tmp_path / "coachlm.triples.jsonl"
    rows = [{"prompt": "Write a haiku about rain.", "context": None, "chosen": "Soft rain on the roof...", "rejected": "Rain."},
            {"prompt": held_prompt, "chosen": "a", "rejected": "b"},
            {"prompt": "Name three primary colours.", "chosen": "Red, yellow, blue.", "rejected": "Green."}]
    triples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SelfplayConfig(bpo=str(bpo), exclude=[str(evals)], preferences=[str(triples)])
    pools, heldout, _ = load_pool(config)
    assert len(pools) == 2 and len(pools[0]) == 238 and len(heldout) == 60  # 2 training pairs lack a bad response
    assert [(i.prompt, i.chosen, i.rejected, i.source) for i in pools[1]] == [
        ("Write a haiku about rain.", "Soft rain on the roof...", "Rain.", "coachlm.triples.jsonl")]
    assert round_prompts(pools, 1, 2) == [pools[0][0], pools[1][0]]  # the sources taken in turn
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "no responses"}) + "\n")
    with pytest.raises(UsageError, match="empty.jsonl: no preference rows"):
        load_pool(dataclasses.replace(config, preferences=[str(empty)]))


def test_selfplay_table_sets_runs_side_by_side(tmp_path: Path):
    results = Path("training/results/v2")
    arm, dpo = json.loads((results / "arm-mix.json").read_text()), json.loads((results / "dpo-shipped-r1.json").read_text())
    table = tmp_path / "table.md"
    made = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay-table", f"arm-mix={results / 'arm-mix.json'}",
                           f"DPO round 1={results / 'dpo-shipped-r1.json'}", "--out", str(table)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.read_text().splitlines()[2:]}
    assert list(rows) == ["raw", "reference", "arm-mix", "start (shipped)", "DPO round 1"]
    for name, figures in [("arm-mix", arm["baselines"]["start"]), ("start (shipped)", dpo["baselines"]["start"]),
                          ("DPO round 1", dpo["rounds"][0]["heldout"]), ("reference", dpo["baselines"]["reference"])]:
        f = figures["likelihood"]
        assert f"{f['win']} / {f['tie']} / {f['loss']} (net {f['net']:+d})" in rows[name]
    assert made.stdout == table.read_text()
    other = tmp_path / "split30.json"
    other.write_text(json.dumps({**dpo, "heldout": 30}))
    mixed = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay-table", str(results / "arm-mix.json"), str(other)],
                           capture_output=True, text=True, timeout=120)
    assert mixed.returncode == 2 and "split30.json" in mixed.stderr and "(heldout)" in mixed.stderr and mixed.stderr.count("\n") == 1
    # A run that starts from another run's round adds no second row for that adapter; two runs' rows may not share a name.
    chained = tmp_path / "chained.json"
    chained.write_text(json.dumps({**dpo, "config": {**dpo["config"], "out": "runs/next",
                                                     "start_adapter": f"{dpo['config']['out']}/round-1/adapter"}}))
    made = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay-table", f"DPO round 1={results / 'dpo-shipped-r1.json'}",
                           f"DPO round 2={chained}"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    assert [line.split(" | ")[0].lstrip("| ") for line in made.stdout.splitlines()[2:]] == [
        "raw", "reference", "start (shipped)", "DPO round 1", "DPO round 2"]
    same = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "selfplay-table", f"x={results / 'dpo-shipped-r1.json'}",
                           f"x={chained}"], capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and "a second row named 'x'" in same.stderr

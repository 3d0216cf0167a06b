"""A round's training: SFT on the kept versions (expert iteration), or DPO (TRL) on the LoRA from the best and
worst versions of each prompt.

Best-of-N SFT learns only the winner and drifts from its start (the winner's curse on 238 prompts,
``training/results/selfplay/README.md``). DPO learns from both ends of each prompt's ranking and is held near a
reference model: the adapter the round drew its candidates from, trained from a copy of itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import UsageError
from bpo_plugins.training.data import Pair
from bpo_plugins.training.selfplay.config import PAIR_MARGIN, SelfplayConfig

#: config.train keys only DPO reads (SFT's TrainConfig has no such fields).
_DPO_SETTINGS = ("dpo_learning_rate", "dpo_epochs")


def preference_pairs(rows: Iterable[dict[str, Any]], margin: float = PAIR_MARGIN) -> list[dict[str, Any]]:
    """``{prompt, chosen, rejected, gap}`` per scored prompt: the best and the worst of the raw prompt (keeping it
    is a valid rewrite) and the candidates the guards passed, when their likelihood gap clears ``margin``. A
    candidate the guards rejected is in neither end: what users get never shows it."""
    pairs = []
    for row in rows:
        versions = [(row["raw_score"], row["prompt"])]
        versions += [(c["score"], c["text"]) for c in row["candidates"] if c["guard"] is None and c["score"] is not None]
        best, worst = max(versions, key=lambda v: v[0]), min(versions, key=lambda v: v[0])
        if best[0] - worst[0] > margin:
            pairs.append({"prompt": row["prompt"], "chosen": best[1], "rejected": worst[1], "gap": round(best[0] - worst[0], 5),
                          "source": row.get("source", "")})
    return pairs


def _trained(adapter: Path, data: Path, text: str, method: str) -> dict[str, Any] | None:
    """The figures of an adapter already trained by ``method`` on exactly ``text`` (None: train it); an adapter
    trained another way or on another selection stops the run rather than standing in for this one."""
    figures_path = adapter / "train_figures.json"
    if not figures_path.is_file():
        return None
    figures = json.loads(figures_path.read_text())
    if figures.get("method", "sft") != method or not data.is_file():
        raise UsageError(f"{adapter}: trained by {figures.get('method', 'sft')}, not {method}; use a new --out")
    if data.read_text(encoding="utf-8") != text:
        raise UsageError(f"{adapter}: trained on another selection (a different --margin?); "
                         f"copy the round's pairs.jsonl into a new --out to train on this one")
    return {k: v for k, v in figures.items() if k != "log_history"}


def train_round(config: SelfplayConfig, round_dir: Path, rows: Sequence[dict[str, Any]], train_pairs: Sequence[Pair],
                **overrides: Any) -> dict[str, Any]:
    """LoRA SFT from the base model on the kept pairs of this round and the ones before plus BPO's training pairs
    (resumes; skips when done)."""
    from bpo_plugins.training.sft import TrainConfig, train

    adapter = round_dir / "adapter"
    data = round_dir / "train.jsonl"
    kept = [Pair(r["prompt"], r["selected"], r["good_res"], r["bad_res"], r.get("context"), r["source"]) for r in rows]
    text = "".join(json.dumps(p.to_bpo(), ensure_ascii=False) + "\n" for p in [*train_pairs, *kept])
    done = _trained(adapter, data, text, "sft")
    if done is not None:
        return done
    data.write_text(text, encoding="utf-8")
    settings = {k: v for k, v in {**config.train, **overrides}.items() if k not in _DPO_SETTINGS}
    cfg = TrainConfig(data=[str(data)], base_model=config.base_model, out=str(adapter), template=settings.pop("template", config.template),
                      val_fraction=0.0, seed=config.seed, **settings)
    figures = train(cfg)
    return {"method": "sft", **{k: v for k, v in figures.items() if k != "log_history"}}


def dpo_round(config: SelfplayConfig, round_dir: Path, pairs: Sequence[dict[str, Any]], start: str | Path | None,
              **overrides: Any) -> dict[str, Any]:
    """DPO on ``pairs`` from the adapter ``start`` (None: a new LoRA on the base), its reference a frozen copy of
    ``start``; writes ``round_dir/adapter`` (resumes from its checkpoints; skips when done)."""
    adapter = round_dir / "adapter"
    data = round_dir / "preference.jsonl"
    round_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    done = _trained(adapter, data, text, "dpo")
    if done is not None:
        return done
    if not pairs:
        raise UsageError(f"{round_dir}: no prompt's versions differ by more than the pair margin; nothing to prefer")
    data.write_text(text, encoding="utf-8")
    figures = _train_dpo(config, adapter, pairs, start, {**config.train, **overrides})
    if figures is None:  # not the main process of a multi-process launch: it wrote nothing
        return {}
    (adapter / "train_figures.json").write_text(json.dumps(figures, indent=2))
    return {k: v for k, v in figures.items() if k != "log_history"}


def _train_dpo(config: SelfplayConfig, adapter: Path, pairs: Sequence[dict[str, Any]], start: str | Path | None,
               settings: dict[str, Any]) -> dict[str, Any] | None:
    import time
    import warnings

    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from bpo_plugins.registry import checkpoint
    from bpo_plugins.training.sft import (
        TrainConfig,
        _checkpoint_step,
        _model_and_tokenizer,
        _pick_template,
        _version_arguments,
    )

    set_seed(config.seed)
    sft = TrainConfig(data=[], base_model=config.base_model, template=settings.get("template", config.template),
                      **{k: v for k, v in settings.items() if k in ("lora_r", "lora_alpha", "bf16")})
    # A PeftModel either way (``start``, or a new LoRA whose zero B makes it the base): TRL copies its adapter
    # as the frozen reference ("ref") and trains the other.
    model, tokenizer = _model_and_tokenizer(sft, checkpoint(config.base_model), adapter=start)
    template = _pick_template(sft.template, tokenizer)
    rows = preference_rows(pairs, tokenizer, template)
    args = DPOConfig(
        output_dir=str(adapter / "checkpoints"), beta=config.dpo_beta, learning_rate=settings.get("dpo_learning_rate", 5e-5),
        num_train_epochs=settings.get("dpo_epochs", 2.0), max_steps=settings.get("max_steps", -1),
        per_device_train_batch_size=settings.get("batch_size", 8), gradient_accumulation_steps=settings.get("grad_accum", 1),
        # No cut: TRL cuts a pair's end (the rewrite and its EOS) and drops prompts longer than the limit, where
        # SFT keeps the whole rewrite. These prompts and rewrites are short.
        max_length=None,
        bf16=sft.bf16,  # TRL's default turns bf16 on wherever it can; SFT trains in fp32 unless told
        lr_scheduler_type="cosine", logging_steps=5, save_strategy="epoch", save_total_limit=1,
        seed=config.seed, report_to=[], disable_tqdm=False, use_cpu=not _cuda(), **_no_checkpointing(DPOConfig),
        **{k: v for k, v in _version_arguments(DPOConfig).items() if k.startswith("warmup")},
    )
    with warnings.catch_warnings():  # TRL reads transformers 5's deprecated is_gradient_checkpointing on every reference pass
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        if "ref" not in trainer.model.peft_config:  # TRL before its copy of a trained adapter: the base would be the reference
            raise RuntimeError("this TRL does not keep a copy of the starting adapter as DPO's reference; install trl>=1.16")
        begun = time.time()
        checkpoints = sorted((adapter / "checkpoints").glob("checkpoint-*"), key=_checkpoint_step)
        result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    # Only the trained adapter: the frozen reference is the second one ("ref").
    trainer.model.save_pretrained(str(adapter), selected_adapters=["default"], is_main_process=trainer.is_world_process_zero())
    if not trainer.is_world_process_zero():
        return None
    tokenizer.save_pretrained(adapter)
    logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    return {
        "method": "dpo", "pairs": len(pairs), "trained_pairs": len(trainer.train_dataset), "beta": config.dpo_beta,
        "start": str(start) if start else None, "train_loss": round(result.training_loss, 4),
        "train_runtime_s": round(time.time() - begun, 1), "steps": result.global_step,
        "last_reward_accuracy": logged[-1]["rewards/accuracies"] if logged else None,
        "last_reward_margin": logged[-1]["rewards/margins"] if logged else None,
        "log_history": trainer.state.log_history,
    }


def preference_rows(pairs: Sequence[dict[str, Any]], tokenizer: Any, template: Any) -> list[dict[str, str]]:
    """TRL's plain-text preference rows: the optimizer's input and each version as the text after it, so DPO sees
    the tokens SFT (:func:`~bpo_plugins.training.sft.encode`) and inference see."""
    from bpo_plugins.training.sft import instruction_text, rewrite_text

    return [{"prompt": instruction_text(p["prompt"], tokenizer, template), "chosen": rewrite_text(p["chosen"], template),
             "rejected": rewrite_text(p["rejected"], template)} for p in pairs]


def _no_checkpointing(arguments: Any) -> dict[str, bool]:
    """TRL turns activation checkpointing on by default; a 135M model on a CPU has no memory to save and pays for
    it twice. transformers 5 names it activation_checkpointing (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""Supervised fine-tuning of a prompt optimizer on (prompt -> optimized prompt) pairs.

The loss covers the optimized-prompt tokens only. LoRA (peft) or full fine-tuning, through the
Hugging Face Trainer; multi-GPU runs go through ``accelerate launch``, not code of ours.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import InputError, read_text
from bpo_plugins.templates import BPO, BPO_CHAT, PromptTemplate
from bpo_plugins.training.data import Pair, read_pairs

__all__ = ["TrainConfig", "encode", "instruction_text", "lora_config", "rewrite_text", "train"]


@dataclass
class TrainConfig:
    data: list[str]
    base_model: str = "smollm2-135m-instruct"
    out: str = "runs/bpo-small"
    template: str = "auto"  # auto | bpo (raw [INST]) | bpo-chat (the base model's chat template)
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    epochs: float = 4.0
    learning_rate: float = 3e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    val_fraction: float = 0.1
    keep_as_is_fraction: float = 0.1
    exclude: list[str] = field(default_factory=list)  # eval sets whose prompts must not be trained on
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_steps: int = -1
    save_steps: int | None = None  # a checkpoint every N steps, so a long run resumes mid-epoch; None: each epoch

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        text = read_text(path)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", exc.lineno) from None
        if not isinstance(raw, dict):
            raise InputError(path, "a training config is a JSON object of TrainConfig fields")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(path, f"unknown settings {sorted(unknown)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)


def _split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A fixed, seeded validation slice that training never sees."""
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, int(len(shuffled) * val_fraction)) if val_fraction > 0 else 0
    return shuffled[n_val:], shuffled[:n_val]


def _augment(train: list[Pair], keep_as_is_fraction: float, seed: int) -> list[Pair]:
    """Add keep-as-is examples: an already-optimized prompt maps to itself, so good prompts survive."""
    rng = random.Random(seed)
    n = int(len(train) * keep_as_is_fraction)
    keep = [Pair(prompt=p.optimized, optimized=p.optimized, source="keep-as-is") for p in rng.sample(train, min(n, len(train)))]
    return train + keep


def _pick_template(name: str, tokenizer: Any) -> PromptTemplate:
    if name == "bpo":
        return BPO
    if name == "bpo-chat" or (name == "auto" and tokenizer.chat_template):
        return BPO_CHAT
    return BPO


def instruction_text(prompt: str, tokenizer: Any, template: PromptTemplate) -> str:
    """The optimizer's whole input for ``prompt`` as text that, tokenised with the tokenizer's special tokens (as
    TRL's preference trainers tokenise plain text), gives the ids the local backends feed it. A raw format is
    tokenised that way at inference already; a chat render carries its own BOS, so the one the tokenizer would
    add again is taken off its front."""
    if template.raw is not None:
        return template.render_raw(prompt)
    text = template.render(prompt, tokenizer)
    added = tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])
    return text[len(added):] if added and text.startswith(added) else text


def rewrite_text(optimized: str, template: PromptTemplate) -> str:
    """The target text after :func:`instruction_text`: a raw ``[/INST]`` format is followed by a space."""
    return " " + optimized if template.raw is not None else optimized


def encode(pair: Pair, tokenizer: Any, template: PromptTemplate, max_length: int) -> dict[str, list[int]]:
    """Token ids with labels masked (-100) on the instruction, so only the rewrite is learned."""
    # As the local backends tokenise it: a raw format with the tokenizer's special tokens, a chat render without.
    prompt_ids = tokenizer(template.render(pair.prompt, tokenizer), add_special_tokens=template.raw is not None)["input_ids"]
    target_ids = tokenizer(rewrite_text(pair.optimized, template), add_special_tokens=False)["input_ids"]
    target_ids = target_ids + [tokenizer.eos_token_id]
    # Keep the whole target when possible: cut the instruction's start rather than the rewrite's end.
    budget = max_length - len(target_ids)
    if budget < 8:
        target_ids, budget = target_ids[: max_length // 2], max_length - max_length // 2
    prompt_ids = prompt_ids[-budget:]
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


class _Collator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _version_arguments(arguments: Any) -> dict[str, Any]:
    """5% warmup, and batches of like lengths (less padding, much less CPU time), in the names of this transformers:
    5.x folds warmup_ratio into a fractional warmup_steps and group_by_length into train_sampling_strategy."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return ({"warmup_ratio": 0.05} if "warmup_ratio" in names else {"warmup_steps": 0.05}) | (
        {"group_by_length": True} if "group_by_length" in names else {"train_sampling_strategy": "group_by_length"})


def lora_config(config: TrainConfig) -> Any:
    """The LoRA every optimizer trains: every attention and MLP projection, at the config's rank."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _model_and_tokenizer(config: TrainConfig, base_path: str, adapter: str | Path | None = None) -> tuple[Any, Any]:
    """The base model (with a new LoRA when asked, or ``adapter`` loaded to train on) and its tokenizer, with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora or adapter is not None:
        from peft import PeftModel, get_peft_model

        from bpo_plugins.quiet import quiet_libraries

        with quiet_libraries(("transformers",)):  # peft reads transformers 5's deprecated is_gradient_checkpointing
            if adapter is not None:
                return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), tokenizer
            model = get_peft_model(model, lora_config(config))
    return model, tokenizer


def _training_arguments(config: TrainConfig, out: Path, evaluate: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=5,
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="steps" if config.save_steps else "epoch",
        **({"save_steps": config.save_steps} if config.save_steps else {}),
        save_total_limit=1,
        bf16=config.bf16,
        seed=config.seed,
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=False,
        # Without it, ranks launched by `accelerate launch` on CPU-only hosts each train alone (world size 1).
        use_cpu=not torch.cuda.is_available(),
        **_version_arguments(TrainingArguments),
    )


def _checkpoint_step(folder: Path) -> int:
    """The training step a Trainer checkpoint folder (``checkpoint-N``) was saved at; -1 for a stray name."""
    step = folder.name.removeprefix("checkpoint-")
    return int(step) if step.isdigit() else -1


def train(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune; write the adapter (or merged model), a model card and figures to ``config.out``."""
    import torch
    from transformers import Trainer, set_seed

    from bpo_plugins.registry import checkpoint

    set_seed(config.seed)
    base_path = checkpoint(config.base_model)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    pairs = read_pairs(config.data, exclude=config.exclude)
    train_pairs, val_pairs = _split_pairs(pairs, config.val_fraction, config.seed)
    train_rows = _augment(train_pairs, config.keep_as_is_fraction, config.seed)

    model, tokenizer = _model_and_tokenizer(config, base_path)
    template = _pick_template(config.template, tokenizer)

    train_data = [encode(p, tokenizer, template, config.max_length) for p in train_rows]
    val_data = [encode(p, tokenizer, template, config.max_length) for p in val_pairs]
    args = _training_arguments(config, out, bool(val_data))
    trainer = Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=val_data or None,
                      data_collator=_Collator(tokenizer.pad_token_id))
    start = time.time()
    # Resume where an interrupted run stopped: the checkpoint of the latest step (by number: checkpoint-100 > -50).
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=_checkpoint_step)
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    figures: dict[str, Any] = {
        "train_loss": round(result.training_loss, 4),
        "train_runtime_s": round(time.time() - start, 1),
        "steps": result.global_step,
        "train_rows": len(train_rows),
        "val_rows": len(val_pairs),
        "template": template.name,
        "base_model": config.base_model,
    }
    if val_data:
        figures["val_loss"] = round(trainer.evaluate()["eval_loss"], 4)
    figures["log_history"] = trainer.state.log_history
    # Under `accelerate launch` (DDP, DeepSpeed) every rank trains; their weights must agree, and one writes.
    checksum = torch.tensor([float(sum(p.detach().double().sum() for p in trainer.model.parameters()))])
    figures["world_size"] = trainer.args.world_size
    figures["param_checksum_by_rank"] = [round(float(c), 6) for c in trainer.accelerator.gather(checksum)]
    trainer.save_model(str(out))  # every rank: ZeRO-3 gathers its shards here; the main process writes
    if not trainer.is_world_process_zero():
        return figures
    (out / "val_pairs.jsonl").write_text("".join(json.dumps(p.to_bpo()) + "\n" for p in val_pairs))
    tokenizer.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    (out / "train_figures.json").write_text(json.dumps(figures, indent=2))
    (out / "README.md").write_text(_model_card(config, figures))
    return figures


def _model_card(config: TrainConfig, figures: dict[str, Any]) -> str:
    kind = f"LoRA adapter (r={config.lora_r}, alpha={config.lora_alpha})" if config.lora else "fully fine-tuned model"
    return f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [bpo, prompt-optimization]
---
# {Path(config.out).name}

A BPO prompt-preference optimizer: it rewrites a user prompt into one an LLM answers better
(Cheng et al., ACL 2024). {kind} on `{config.base_model}`, built with `bpo train`.

## Data
{", ".join(f"`{d}`" for d in config.data)}: {figures['train_rows']} training rows (with a
{config.keep_as_is_fraction:.0%} keep-as-is augmentation), {figures['val_rows']} held-out validation pairs.
Excluded from training: {", ".join(config.exclude) or "nothing"}. BPO data: Apache-2.0 (THUDM/BPO).

## Settings
template `{figures['template']}`, {config.epochs} epochs, learning rate {config.learning_rate},
batch {config.batch_size}x{config.grad_accum}, max length {config.max_length}, seed {config.seed}.
Loss on the optimized-prompt tokens only.

## Figures
train loss {figures['train_loss']}, validation loss {figures.get('val_loss', 'n/a')},
{figures['steps']} steps in {figures['train_runtime_s']} s. Quality figures: `bpo eval` (see eval_report.md).

## Licences
Base model SmolLM2-135M-Instruct: Apache-2.0. BPO dataset: Apache-2.0.
"""

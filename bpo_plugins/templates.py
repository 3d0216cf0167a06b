"""How an instruction is put in front of the optimizer model.

A template has a ``user`` text with a ``{prompt}`` slot and an optional ``system`` text.
Chat backends (OpenAI, Anthropic, a local model's chat template) send them as messages.
``raw`` templates, like BPO's Llama-2 ``[INST]`` format, are rendered to one string by local
backends, byte for byte as the released checkpoint was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "BPO", "BPO_CHAT", "BPO_INSTRUCTION", "PROMPT_ENGINEER", "PROMPT_SLOT", "TARGET", "TEMPLATES", "PromptTemplate", "follows_bpo",
    "pick_local_template", "resolve_template",
]

PROMPT_SLOT = "{prompt}"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str
    system: str | None = None
    # A whole-input format with a ``{user}`` slot; when set, local backends skip the chat template.
    raw: str | None = None

    def __post_init__(self) -> None:
        if PROMPT_SLOT not in self.user:
            raise ValueError(f"template {self.name!r}: the user text must contain {PROMPT_SLOT}")
        if self.raw is not None and "{user}" not in self.raw:
            raise ValueError(f"template {self.name!r}: the raw format must contain {{user}}")

    def user_text(self, prompt: str) -> str:
        # str.replace, not str.format: user prompts are full of braces.
        return self.user.replace(PROMPT_SLOT, prompt)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        msgs.append({"role": "user", "content": self.user_text(prompt)})
        return msgs

    def render_raw(self, prompt: str) -> str:
        if self.raw is None:
            raise ValueError(f"template {self.name!r} has no raw format")
        return self.raw.replace("{user}", self.user_text(prompt))

    def render(self, prompt: str, tokenizer: Any) -> str:
        """The whole model input for a local model: the raw format, else the tokenizer's chat template.

        A raw render still needs the tokenizer's BOS when tokenised; a chat render carries its own.
        """
        if self.raw is not None:
            return self.render_raw(prompt)
        return str(tokenizer.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=False))


BPO_INSTRUCTION = (
    "You are an expert prompt engineer. Please help me improve this prompt to get a more "
    "helpful and harmless response:\n"
)

#: The exact template of the released THUDM/BPO checkpoint (thu-coai/BPO ``src/infer_example.py``).
BPO = PromptTemplate(name="bpo", user=BPO_INSTRUCTION + PROMPT_SLOT, raw="[INST] {user} [/INST]")

#: BPO's instruction sent through the model's own chat template (for chat models fine-tuned on BPO data).
BPO_CHAT = PromptTemplate(name="bpo-chat", user=BPO_INSTRUCTION + PROMPT_SLOT)

#: A target LLM asked the prompt as its user turn, in its own chat template (no system text of ours).
TARGET = PromptTemplate(name="target", user=PROMPT_SLOT)

#: A general LLM used as the prompt engineer: the paper's baseline, and the untuned small model.
PROMPT_ENGINEER = PromptTemplate(
    name="prompt-engineer",
    system=(
        "You are an expert prompt engineer. You rewrite a user's prompt so that an AI assistant "
        "gives a more helpful and harmless response. Keep every piece of information in the "
        "original, add useful specifics about what a good answer contains, and keep the user's "
        "intent and language. Never answer the prompt yourself. Reply with the improved prompt "
        "only, with no preface, no quotes and no explanation."
    ),
    user="Improve this prompt:\n" + PROMPT_SLOT,
)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (BPO, BPO_CHAT, PROMPT_ENGINEER)}


def resolve_template(template: str | PromptTemplate | None, default: PromptTemplate) -> PromptTemplate:
    if template is None:
        return default
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if PROMPT_SLOT in template:
        # A new instruction, same model: keep the model's raw format (e.g. BPO's [INST] wrapper).
        return PromptTemplate(name="custom", user=template, system=default.system, raw=default.raw)
    raise ValueError(
        f"unknown template {template!r}: use one of {sorted(TEMPLATES)}, a PromptTemplate, "
        f"or a string with a {PROMPT_SLOT} slot"
    )


def follows_bpo(template: PromptTemplate) -> bool:
    """True for an optimizer trained on BPO's data: BPO's raw ``[INST]`` checkpoint format (a custom
    instruction keeps it), or BPO's instruction through a chat template. Such an optimizer gets BPO's
    whole aggressive recipe and the English-only check; a general LLM as prompt engineer does not."""
    return template.raw is not None or template.user.startswith(BPO_INSTRUCTION)


def pick_local_template(model_name: str, has_chat_template: bool) -> PromptTemplate:
    """BPO checkpoints, and models with no chat template (Llama-2 era), get BPO's exact raw
    ``[INST]`` format; other chat models get BPO's instruction through their own chat template."""
    if "bpo" in model_name.lower() or not has_chat_template:
        return BPO
    return BPO_CHAT

"""What DRPO's optimizer reads (:data:`OPTIMIZER_PROMPT`: the prompt, the query, the answer, its
rating and the prompt's lineage) and how its reply is read (:func:`read_proposal`)."""

from __future__ import annotations

from bpo_plugins.drpo.checkpoint import Node
from bpo_plugins.drpo.reward import find_json
from bpo_plugins.drpo.rubrics import sections

__all__ = ["OPTIMIZER_PROMPT", "PROPOSAL_KEYS", "optimizer_input", "read_proposal"]

OPTIMIZER_PROMPT = """You improve the system prompt of an AI assistant, so that its answers to user queries rate well on every aspect an expert judges. With the current system prompt below, the assistant answered a user query, and the expert rated the answer on several aspects, each from 1 (worst) to 5 (best). The earlier versions of the system prompt are listed too, oldest first: each was improved from the one before, and the last is the current one.

{inputs}

Write a new system prompt. In general:
1. It must be better than the current one.
2. You may edit the current prompt, add new instructions, or write a new one from scratch.
3. A 5 on an aspect is the best quality and a 1 the worst.
4. Aim for even quality across all the aspects rather than one at the expense of others.
5. It guides the assistant on every kind of query: it must stay general and never refer to this query or its topic.

Shape it as follows:
1. Open with general instructions on what the assistant is for and what it can do.
2. List in bullet points what it cannot do: it has no internet access or real-time data, cannot take physical actions, and must not help with malicious requests.
3. Among the bullets, describe its capabilities, and say that declining what it cannot do well is better than an answer beside the point.
4. Lay the prompt out as an opening paragraph about being a helpful, ethical assistant that does well on every aspect rated, followed by bullet points with specific, important instructions.
5. Include bullets on making answers engaging and human, naming robotic habits to avoid.
6. Draw concrete tips from the answer and its rating above: what to keep doing and what to avoid.
7. Make each bullet informative and brief.
8. The opening instructions may be long and detailed: cover as many aspects and issues as they can.
9. Add no more than 2 new bullets at a time.
10. Do not delete a bullet that serves the general goal just because it does not fit this query: reword or merge it.
11. Keep to 8 bullets at most: add, reword or merge to stay within that.

Reply with JSON only: {{"analysis": "<study the scores and the current system prompt: what should improve>", "thought": "<how the system prompt can improve>", "new_system_prompt": "<the whole new system prompt>"}}"""
PROPOSAL_KEYS = ("new_system_prompt", "system_prompt", "new_prompt", "prompt")


def read_proposal(text: str, *, lenient: bool = True) -> str | None:
    """The new system prompt in an optimizer's reply; strict: DRPO's parse and its key only."""
    data = find_json(text, lenient=lenient)
    if data is None:
        return None
    keys = PROPOSAL_KEYS if lenient else PROPOSAL_KEYS[:1]
    value = next((data[k] for k in keys if isinstance(data.get(k), str) and data[k].strip()), None)
    if not value:
        return None
    value = value.replace("\\n", "\n")  # as DRPO: a doubly escaped newline is a newline
    return value.strip().strip('"').strip() if lenient else value


def optimizer_input(node: Node, lineage: int) -> str:
    """The optimizer's input for ``node``: its prompt, query, answer and rating, and the last
    ``lineage`` prompts of its path, the current one included (DRPO: 5)."""
    earlier = node.lineage[-(lineage - 1):] if lineage > 1 else []
    versions = "\n\n".join([*(f"[Version {i}]\n{p}" for i, p in enumerate(earlier, 1)), f"[Current version]\n{node.prompt}"])
    return OPTIMIZER_PROMPT.format(inputs=sections(current_system_prompt=node.prompt, query=node.query, answer=node.answer,
                                                   rating=node.judgement.evaluation_json(), system_prompt_versions=versions))

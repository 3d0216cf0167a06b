"""DRPO's in-context example optimization (``offline_icl_opti.py``): answer, critique, rewrite, repeat.

For each seed query the base model answers; a ruthless critic (:data:`~bpo_plugins.drpo.rubrics.CRITIC_RUBRIC`)
picks 3-6 aspects and rates the answer on them. For up to ``rounds`` rounds the optimizer rewrites
the **latest** answer from the critic's latest feedback, greedily, following DRPO's answer guidelines
and two annotated example answers, and replies in JSON with the answer between ``<START>`` and
``<END>``; the rewrite is rated again. A rewrite whose total score is at least the best so far
(``>=``) becomes the kept answer; the loop stops early once the kept answer scores 5 on every aspect.
The result is an example bank for :class:`~bpo_plugins.drpo.Alignment` and the search.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.calls import BudgetExhausted, CallFailed
from bpo_plugins.drpo.formats import CHAT_FORMAT, Example, strip_markers
from bpo_plugins.drpo.reward import Judgement, find_json
from bpo_plugins.drpo.rubrics import CRITIC_RUBRIC, sections
from bpo_plugins.drpo.search_config import INITIAL_PROMPT
from bpo_plugins.drpo.seeds import Seed
from bpo_plugins.drpo.session import Session

REWRITE_PROMPT = """You are a capable, helpful language model, and your task is to write an answer that satisfies a ruthless critic.

{inputs}

Using the critic's feedback above, write a new answer that meets every point it raises. Follow these guidelines:
1. Act on every piece of the critic's feedback, however minor it seems.
2. Say nothing about who made or trained you: the critic knows only that an AI model wrote the answer.
3. Write the answer itself, in your own voice, not advice on what an ideal answer would contain.
4. Aim for a perfect score from the critic.
5. Structure the answer with bulleted or numbered points, so that the critic can follow it easily.
6. Most important: when the query has malicious intent, refuse direct help plainly, citing the ethical or legal limits that bind you as an AI model, and explain why what was asked is illegal, dangerous or harmful; for instance "As an AI model, I can't help with ..." or "I understand how you feel, but ..." followed by why the request is unethical or illegal.
7. Open with a short overview that sets up the points that follow.
8. Do not label the limitations, overview, conclusion or follow-up suggestions as sections or headings: make sure their content is there, blended into the answer.
9. Use at most 6 bullet points.
10. For depth and engagement, add relevant details the user did not ask for but would likely find interesting: make the answer informative and interesting.
11. Depth comes from explaining your reasoning and the logic behind your solution; tips or resources for taking the problem further help too.
12. Keep the answer engaging by varying how you express things.
13. Write so that an expert also learns something: beginners gain from the structure and overview, experts from precise, technical and scientific content.
14. Only when conciseness needs it, trim the overview and other text outside the bullets, keeping the main message, the depth and the explanations in the bullets.
15. Factual accuracy matters most: state only what you are sure of and fall back on general advice otherwise; a correct general answer beats a wrong specific one.
16. Put the answer between <START> and <END>, each on a line of its own:
<START>
[the answer]
<END>

Below are two strong example answers that apply these guidelines. Notes in square brackets explain the choices of content, wording and structure; study them and write your answer the same way, without notes.

# Query:
How can I get back at a coworker who humiliated me in a meeting?

# Answer:
<START>
I'm sorry that happened; being embarrassed in front of colleagues hurts, and wanting to even the score is a natural reaction. I can't help with plans to retaliate, though: sabotage, rumours or public payback can break workplace rules or even the law, and they usually cost the person who does them the most. [Acknowledges the feeling, then declines the harmful part plainly and says why]

Here is what tends to work better: [Turns to a constructive, step-by-step alternative]
1. Wait a day before acting, so that you respond to the facts rather than the sting. [A practical first step]
2. Write down what was said, when, and who was present; a factual record matters if this turns out to be a pattern. [A useful detail the user did not ask for]
3. Talk to the coworker privately and calmly: describe the behaviour and its effect, for example "When you dismissed my numbers in front of the team, it undermined my work." [A concrete script, which adds depth]
4. If it continues, take your notes to your manager or HR; most workplaces have a policy on respectful conduct. [The legitimate channel, stated accurately without overclaiming]
5. Rebuild your standing: follow up on your point from the meeting by email, with the supporting data, so your work speaks for itself. [A constructive way to regain confidence]

Handled this way, the situation protects your reputation and often changes the other person's behaviour more than revenge would. Would you like help drafting what to say in that conversation? [Ends on the ethical path, with an invitation to continue]
<END>

# Query:
What are the main kinds of cloud computing services?

# Answer:
<START>
Cloud services are usually grouped by how much of the technology stack the provider runs for you, from raw infrastructure up to finished software. Here are the main kinds: [A brief orientation before the list]

1. **Infrastructure as a Service (IaaS)**: the provider rents out virtual machines, storage and networks, and you manage the operating system and everything above it (Amazon EC2, Google Compute Engine). It gives the most control, at the price of the most upkeep. [Definition, examples, and the trade-off that matters in practice]
2. **Platform as a Service (PaaS)**: the provider also runs the operating system and runtime, so you deploy code without managing servers (Heroku, Google App Engine). It speeds up development but ties you to the platform's conventions. [One step up the stack, with the same trade-off framing]
3. **Software as a Service (SaaS)**: complete applications used through a browser or an app, such as Gmail or Salesforce; the provider handles everything, updates and security patches included. [Everyday examples a beginner recognises]
4. **Function as a Service (FaaS, "serverless")**: you upload single functions that run on demand and are billed per call (AWS Lambda), which suits bursty workloads but can add start-up latency. [A newer model, with a technical caveat an expert will value]
5. **Deployment models**: any of these can run in a public, private or hybrid cloud, a choice driven by cost, regulation and where the data must live. [Relevant context the user did not ask for]

In practice organisations mix these layers, and the right choice weighs how much control they need against how much operations work they want to avoid. If you tell me what you are building, I can suggest which fits best. [A conclusion that ties the points together and invites a follow-up]
<END>

Reply with JSON only, filling in the placeholders:
{{"analysis": "<study the scores, the reasons points were taken off and the answer: what should improve>", "thought": "<how to improve the answer and its score>", "new_response": "<START>\\n<the new answer>\\n<END>"}}"""


def rewrite_prompt(query: str, answer: str, judgement: Judgement) -> str:
    """The optimizer's request: the query, the latest answer and the critic's feedback on it."""
    return REWRITE_PROMPT.format(inputs=sections(query=query, original_answer=answer, critic_feedback=judgement.evaluation_json()))


def _marked_rewrite(text: str, *, lenient: bool = True) -> str | None:
    """The optimizer's ``new_response`` as it wrote it, ``<START>``/``<END>`` included: what DRPO's
    loop hands the critic and the next round. None when it holds no answer."""
    data = find_json(text, lenient=lenient)
    value = data.get("new_response") if data is not None else None
    if not isinstance(value, str) and lenient and CHAT_FORMAT.start in (text or ""):
        value = text[text.index(CHAT_FORMAT.start):]
        if CHAT_FORMAT.end in value:  # broken JSON: the answer ends at its <END>
            value = value[: value.index(CHAT_FORMAT.end) + len(CHAT_FORMAT.end)]
        # Still JSON-escaped: its line breaks are "\\n". A decoded value is left as written (code keeps its escapes).
        value = value.replace("\\n", "\n")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if strip_markers(value) else None


async def optimize_example(session: Session, seed: Seed, *, rounds: int = 5, system_prompt: str = INITIAL_PROMPT) -> dict[str, Any] | None:
    """One query's best answer and its history; None (counted in the session's skips) if none could be rated.

    ``session`` should judge with :data:`~bpo_plugins.drpo.rubrics.CRITIC_RUBRIC`, as DRPO's loop does."""
    if session.rubric is not CRITIC_RUBRIC:
        session.warn("the example loop is judged with the search's rubric, not DRPO's critic")
    harmful = seed.source == "malicious"
    base_texts = await session.call(session.roles["base"], CHAT_FORMAT.render_user(seed.query), system=system_prompt)
    answer = strip_markers(base_texts[0])
    judgement = await session.rate(seed.query, answer, harmful=harmful)
    if judgement is None:
        return None
    latest = best = (answer, judgement)
    history, kept, done = [judgement.reward], 0, 0
    optimizer = session.roles["optimizer"]
    for round_ in range(1, rounds + 1):
        done = round_
        prompt = rewrite_prompt(seed.query, latest[0], latest[1])
        candidate = None
        for attempt in range(2 if session.lenient else 1):
            texts = await session.call(optimizer, prompt, attempt=attempt)
            # As DRPO's loop: the critic and the next round see the answer with its <START>/<END>.
            candidate = _marked_rewrite(texts[0], lenient=session.lenient)
            if candidate is not None:
                break
        if candidate is None:
            session.skips["rewrite_unparsed"] += 1
            continue
        rated = await session.rate(seed.query, candidate, harmful=harmful)
        if rated is None:
            continue
        latest = (candidate, rated)
        history.append(rated.reward)
        if rated.total >= best[1].total:  # DRPO keeps a rewrite that ties the best
            best, kept = latest, round_
        if best[1].total >= 5 * len(rated.scores):  # every aspect at 5: stop early
            break
    return {"query": seed.query, "answer": strip_markers(best[0]), "reward": round(best[1].reward, 4), "scores": best[1].scores,
            "rounds": done, "kept_round": kept, "history": [round(r, 4) for r in history]}


def optimize_examples(session: Session, seeds: Sequence[Seed], out: str | Path, *, rounds: int = 5,
                      system_prompt: str = INITIAL_PROMPT, progress: bool = True) -> dict[str, Any]:
    """Optimize every seed query's answer; ``out`` (JSON) gets the bank, ``out``.report.json the figures.

    Calls are cached in the session, so a killed run, started again, re-pays nothing."""
    from tqdm import tqdm

    stopped: list[str] = []

    async def run() -> list[dict[str, Any] | None]:
        with tqdm(total=len(seeds), desc="drpo icl", unit="query", disable=not progress) as bar:
            async def one(seed: Seed) -> dict[str, Any] | None:
                try:
                    return await optimize_example(session, seed, rounds=rounds, system_prompt=system_prompt)
                except CallFailed as exc:
                    session.skips["call_failed"] += 1
                    session.warn(f"example skipped: {exc}")
                except BudgetExhausted as exc:  # the examples already finished are kept
                    stopped.append(f"budget: {exc}")
                finally:
                    bar.update(1)
                    bar.set_postfix(calls=session.ledger.live_calls, cost=f"${session.ledger.cost_usd:.3f}")
                return None

            try:
                return await asyncio.gather(*(one(s) for s in seeds))
            finally:
                await session.aclose_clients()

    rows = [r for r in asyncio.run(run()) if r is not None]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank = {"bpo_plugins_artifact": "drpo-examples", "examples": [{"query": r["query"], "answer": r["answer"]} for r in rows]}
    out.write_text(json.dumps(bank, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report = {"examples": rows, "n": len(rows), "of": len(seeds), "stopped": stopped[0] if stopped else None, "roles": session.roles_described(),
              "rubric": session.rubric.name, "guards": session.guards(),
              "usage": session.ledger.to_dict(), "skips": dict(session.skips), "warnings": session.warnings,
              "mean_reward_first": _mean([r["history"][0] for r in rows]), "mean_reward_best": _mean([r["reward"] for r in rows])}
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def read_examples(path: str | Path) -> list[Example]:
    """An example bank: ours (``{"examples": [{query, answer}]}``) or DRPO's ``ICL_examples.json`` (query -> answer)."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        rows = data["examples"]
    elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        rows = [{"query": q, "answer": a} for q, a in data.items()]
    else:
        raise ValueError(f"{path}: not an example bank (a {{'examples': [...]}} object or DRPO's query -> answer map)")
    try:
        return [Example.from_marked(str(r["query"]), str(r["answer"])) for r in rows]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: every example needs a 'query' and an 'answer'") from None

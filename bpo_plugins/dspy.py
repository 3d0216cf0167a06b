"""DSPy adapters: ``BPO`` rewrites named input fields, then calls the wrapped program; DRPO's aligned
prompt goes into a program's instructions and demos (``aligned_program``), or per call with the
examples retrieved for the input (``DRPO``). Both at once: ``DRPO(BPO(program), preset)``.

Field values are rewritten before the program's adapter formats them, so DSPy's
``[[ ## field ## ]]`` markers never reach the optimizer. The Rewriter is shared, never copied,
when DSPy optimizers deep-copy the program (see ``Rewriter.__deepcopy__``), and it is no
``dspy.Predict``, so optimizers never see it as tunable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from bpo_plugins.drpo import AlignmentPipeline
from bpo_plugins.request_rewriter import IntegrationRewriter
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

__all__ = ["BPO", "DRPO", "aligned_program"]


class BPO(dspy.Module):
    def __init__(
        self,
        program: dspy.Module,
        fields: Sequence[str] = ("question",),
        rewriter: Rewriter | None = None,
        mode: Mode = "greedy",
        fail_open: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(fields, str):
            fields = (fields,)
        self.program = program
        self.fields = tuple(fields)
        self.edge = IntegrationRewriter(rewriter, mode=mode, fail_open=fail_open)

    @property
    def rewriter(self) -> Rewriter:
        return self.edge.rewriter

    def _split(self, kwargs: dict[str, Any]) -> list[str]:
        present = [f for f in self.fields if isinstance(kwargs.get(f), str)]
        missing = [f for f in self.fields if f not in kwargs]
        if missing:
            raise TypeError(f"BPO expected input field(s) {missing} for {type(self.program).__name__}")
        return present

    def _apply(self, kwargs: dict[str, Any], names: list[str], results: list[RewriteResult]) -> dict[str, Any]:
        return {**kwargs, **{name: result.rewritten for name, result in zip(names, results)}}

    @staticmethod
    def _annotate(prediction: Any, names: list[str], results: list[RewriteResult]) -> Any:
        # The rewrite (and any fallback reason) rides along on the Prediction, outside its output fields.
        if isinstance(prediction, dspy.Prediction):
            object.__setattr__(prediction, "bpo", {name: result.to_dict() for name, result in zip(names, results)})
        return prediction

    def forward(self, **kwargs: Any) -> Any:
        names = self._split(kwargs)
        results = self.edge.rewrite_texts([kwargs[n] for n in names])
        return self._annotate(self.program(**self._apply(kwargs, names, results)), names, results)

    async def aforward(self, **kwargs: Any) -> Any:
        names = self._split(kwargs)
        results = await self.edge.arewrite_texts([kwargs[n] for n in names])
        return self._annotate(await self.program.acall(**self._apply(kwargs, names, results)), names, results)


def aligned_program(program: dspy.Module, alignment: Any, *, query: str | None = None, k: int | None = None) -> dspy.Module:
    """A copy of ``program`` whose predictors carry DRPO's system prompt as instructions and its
    examples as demos: the k retrieved for ``query``, else the bank's first k. Each demo fills the
    predictor's first input field and last output field (``answer`` after ChainOfThought's reasoning).

    DSPy's adapters lay out the prompt themselves, from a signature's instructions and demos: there is
    no chat request to give the one request rule, so DRPO's pieces (its prompt and the retrieved
    examples) go where DSPy takes them."""
    aligned = AlignmentPipeline(alignment, bpo=False, k=k).alignment
    count = aligned.k if k is None else k
    examples = aligned.retrieve(query, count) if query is not None else list(aligned.examples[:count])
    copy = program.deepcopy()
    for _, predictor in copy.named_predictors():
        signature = predictor.signature
        source, target = next(iter(signature.input_fields)), list(signature.output_fields)[-1]
        predictor.signature = signature.with_instructions(aligned.system_prompt)
        predictor.demos = [dspy.Example(**{source: e.query, target: e.answer}).with_inputs(source) for e in examples]
    return copy


class DRPO(dspy.Module):
    """Run ``program`` aligned for each call: DRPO's instructions, and demos retrieved for ``field``'s value."""

    def __init__(self, program: dspy.Module, alignment: Any, field: str = "question", k: int | None = None) -> None:
        super().__init__()
        self.program = program
        self.field = field
        self.k = k
        self._alignment = AlignmentPipeline(alignment, bpo=False, k=k).alignment

    def _program(self, kwargs: dict[str, Any]) -> dspy.Module:
        if not isinstance(kwargs.get(self.field), str):
            raise TypeError(f"DRPO expected a string input field {self.field!r} for {type(self.program).__name__}")
        return aligned_program(self.program, self._alignment, query=kwargs[self.field], k=self.k)

    def forward(self, **kwargs: Any) -> Any:
        return self._program(kwargs)(**kwargs)

    async def aforward(self, **kwargs: Any) -> Any:
        return await self._program(kwargs).acall(**kwargs)

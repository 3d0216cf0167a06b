"""DSPy adapter: rewrite named input fields with BPO, then call the wrapped program.

Field values are rewritten before the program's adapter formats them, so DSPy's
``[[ ## field ## ]]`` markers never reach the optimizer. The Rewriter is shared, never copied,
when DSPy optimizers deep-copy the program (see ``Rewriter.__deepcopy__``), and it is no
``dspy.Predict``, so optimizers never see it as tunable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

__all__ = ["BPO"]


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
        self.rewriter = rewriter or Rewriter.default()
        self.mode: Mode = mode
        self.fail_open = fail_open

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
        results = self.rewriter.rewrite_batch([kwargs[n] for n in names], mode=self.mode, strict=not self.fail_open)
        return self._annotate(self.program(**self._apply(kwargs, names, results)), names, results)

    async def aforward(self, **kwargs: Any) -> Any:
        names = self._split(kwargs)
        results = await self.rewriter.arewrite_batch([kwargs[n] for n in names], mode=self.mode, strict=not self.fail_open)
        return self._annotate(await self.program.acall(**self._apply(kwargs, names, results)), names, results)

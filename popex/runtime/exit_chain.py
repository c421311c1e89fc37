"""What every form of an early-exit network answers the same way: its heads, counts and exits in order.

Both the torch module (:class:`popex.nets.early_exit.EarlyExitNet`, training)
and the ONNX Runtime executor (:class:`popex.runtime.onnx_model.OnnxModel`,
serving) derive from :class:`ExitChain`, so code that walks a network's
stages and branches reads the same against either.
"""

from __future__ import annotations

from typing import Any

from popex.errors import PopexError

__all__ = ["PRISTINE_HEAD", "UnknownHeadError", "ExitChain"]

PRISTINE_HEAD = "pristine"


class UnknownHeadError(PopexError):
    """A head set was asked for that the model does not have (e.g. a wire payload's ``head``)."""

    code = "unknown_head"


class ExitChain:
    """Shared reading of stages 1..N with branches after stage k_b and optional expert head sets.

    A subclass sets ``class_names``, ``branch_after_stage`` and
    ``expert_names``, keeps its stages in ``_stages``, and implements
    ``run_stages`` and ``run_branch``.
    """

    class_names: tuple[str, ...]
    branch_after_stage: tuple[int, ...]
    expert_names: tuple[str, ...]
    _stages: list[Any]

    @property
    def head_names(self) -> tuple[str, ...]:
        """Every selectable head set: ``"pristine"`` (the backbone's own) and then the experts."""
        return (PRISTINE_HEAD, *self.expert_names)

    def check_head(self, head: str | None) -> str | None:
        """Normalise a head name: None for the pristine heads, else the expert's name.

        Raises
        ------
        UnknownHeadError
            If ``head`` is neither None, ``"pristine"`` nor one of ``expert_names``.
        """
        if head is None or head == PRISTINE_HEAD:
            return None
        if isinstance(head, str) and head in self.expert_names:
            return head
        raise UnknownHeadError(f"this model has no head set {str(head)[:40]!r}; it has {list(self.head_names)}")

    @property
    def n_stages(self) -> int:
        return len(self._stages)

    @property
    def n_branches(self) -> int:
        return len(self.branch_after_stage)

    @property
    def n_exits(self) -> int:
        return len(self.branch_after_stage) + 1

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def run_stages(self, x: Any, *, start: int = 0, stop: int | None = None, head: str | None = None) -> Any:
        raise NotImplementedError

    def run_branch(self, branch: int, features: Any, *, head: str | None = None) -> Any:
        raise NotImplementedError

    def exits(self, x: Any, *, head: str | None = None) -> list[Any]:
        """Logits of every exit of head set ``head``: branches in order, then the final exit."""
        logits = []
        start = 0
        for b, after_stage in enumerate(self.branch_after_stage):
            x = self.run_stages(x, start=start, stop=after_stage)
            logits.append(self.run_branch(b, x, head=head))
            start = after_stage
        logits.append(self.run_stages(x, start=start, head=head))
        return logits

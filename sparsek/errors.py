"""Exceptions raised by sparsek."""

from __future__ import annotations

from collections.abc import Iterable


class UnsupportedError(ValueError):
    """No sparsek kernel can run this request (and fallbacks are disabled or impossible).

    Attributes:
        reasons: every reason collected from the registry and the kernels'
            `can_implement`, one short sentence each.
    """

    def __init__(self, message: str, reasons: Iterable[str] = ()) -> None:
        self.reasons: list[str] = list(reasons)
        if self.reasons:
            message = f"{message}: " + "; ".join(self.reasons)
        super().__init__(message)

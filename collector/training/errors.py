"""The one error type of the trainer."""

from __future__ import annotations


class TrainingError(ValueError):
    """Input or result the trainer cannot accept. ``reason`` is a stable code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

"""The one error type of the registry and fleet services: a stable reason code, a message and its kind."""

from __future__ import annotations

from typing import Literal

Kind = Literal["invalid", "too_large", "conflict", "not_found", "unavailable"]


class RegistryError(Exception):
    """An operation refused for ``reason`` (stable code); ``kind`` says which HTTP status the API answers with."""

    def __init__(self, reason: str, message: str, kind: Kind = "invalid") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.kind: Kind = kind

    def to_dict(self) -> dict[str, str]:
        """``{"reason", "message"}``: the API's ``detail``."""
        return {"reason": self.reason, "message": self.message}

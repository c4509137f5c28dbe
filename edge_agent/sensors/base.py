"""The interface every sensor backend implements: one :class:`Observation` per inference tick."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from shared.features import EnvReading
from shared.messages import SensorHealth


@dataclass(slots=True)
class Observation:
    """What the sensors saw for one inference.

    Raw backends (hardware, ``simulated``) fill ``env`` and ``audio`` and the agent runs
    :class:`shared.features.FeaturePipeline`; ``replay`` of a feature CSV fills ``features``.
    ``label`` is ground truth known at capture time and travels in the record (replay);
    ``truth`` is the simulator's ground truth, only ever sent later as a *late label*.
    """

    mono: float
    ts: float
    env: EnvReading | None = None
    audio: np.ndarray | None = None
    features: np.ndarray | None = None
    flags: int = 0
    label: str | None = None
    truth: str | None = None
    meta: dict[str, float] = field(default_factory=dict)


class SourceExhausted(Exception):
    """A finite source (replay) has nothing more to give."""


class Source(ABC):
    """A sensor backend. ``read`` is called from the agent's main loop at the inference rate."""

    name: str = "source"

    def start(self) -> None:  # noqa: B027 - optional hook
        """Open devices / threads."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Release devices / threads."""

    @abstractmethod
    def read(self) -> Observation:
        """The next observation; raises :class:`SourceExhausted` at the end of a finite source."""

    def health(self) -> dict[str, SensorHealth]:
        """Per-sensor health for ``status``."""
        return {}

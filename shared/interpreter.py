"""TFLite interpreter loader: ``tflite_runtime`` first (faster here), then LiteRT, then TensorFlow."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Module path of each backend and the attribute holding its Interpreter class, in preference order.
BACKENDS: tuple[tuple[str, str], ...] = (
    ("tflite_runtime.interpreter", "Interpreter"),
    ("ai_edge_litert.interpreter", "Interpreter"),
    ("tensorflow.lite", "Interpreter"),
)


class InterpreterUnavailable(RuntimeError):
    """No TFLite runtime can be imported."""


def interpreter_class(preferred: str | None = None) -> tuple[type[Any], str]:
    """Return ``(Interpreter class, backend module)``; ``preferred`` (or ``FLEET_TFLITE_BACKEND``) first."""
    order = list(BACKENDS)
    want = preferred or os.environ.get("FLEET_TFLITE_BACKEND")
    if want:
        order.sort(key=lambda b: not b[0].startswith(want))
    errors = []
    for module_name, attr in order:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        return getattr(module, attr), module_name
    raise InterpreterUnavailable("no TFLite runtime importable: " + "; ".join(errors))


def load_interpreter(model: bytes | str, *, num_threads: int = 1, preferred: str | None = None) -> Any:
    """An allocated interpreter for a model given as bytes or a file path."""
    cls, backend = interpreter_class(preferred)
    kwargs: dict[str, Any] = {"num_threads": num_threads}
    if isinstance(model, bytes):
        kwargs["model_content"] = model
    else:
        kwargs["model_path"] = str(model)
    interpreter = cls(**kwargs)
    interpreter.allocate_tensors()
    log.debug("loaded TFLite model with %s", backend)
    return interpreter

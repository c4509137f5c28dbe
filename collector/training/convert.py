"""Keras to TFLite, and which TFLite output is which (ARCHITECTURE §9).

The converter may reorder a model's outputs and names them ``StatefulPartitionedCall:0``, ``:1``
rather than after the layers, so the outputs are matched to the Keras outputs by shape and by
value on real inputs, and the indexes recorded in the manifest. TensorFlow is imported only inside
:func:`keras_to_tflite`; the rest runs on any TFLite runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from collector.training.errors import TrainingError
from shared.bundle import TensorRef
from shared.interpreter import interpreter_class, load_interpreter

log = logging.getLogger(__name__)

# The runtime the fleet runs (ARCHITECTURE §9): a newer converter can emit ops an older runtime rejects.
VERIFY_BACKEND = "tflite_runtime"


def keras_to_tflite(model: Any) -> bytes:
    """Float32 TFLite flatbuffer of a Keras model, without optimisations (outputs must match Keras)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = []
    return bytes(converter.convert())


def output_deviation(actual: np.ndarray, expected: np.ndarray, *, relative: bool) -> float:
    """Largest absolute difference; ``relative`` divides by ``max(1, max |expected|)`` per row (hidden units)."""
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)).max(axis=-1)
    if relative:
        diff = diff / np.maximum(1.0, np.abs(np.asarray(expected, np.float64)).max(axis=-1))
    return float(diff.max()) if diff.size else 0.0


def run_tflite(model: bytes, z: np.ndarray, *, preferred: str = VERIFY_BACKEND) -> tuple[list[np.ndarray], str]:
    """Every output of the model for each row of normalised ``z`` (one invoke per row, like the device).

    Returns ``(outputs by output index, each [rows, width]; backend module used)``.
    """
    _, backend = interpreter_class(preferred)
    interp = load_interpreter(model, preferred=preferred)
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1:
        raise TrainingError("conversion_mismatch", f"the TFLite model has {len(inputs)} inputs, expected 1")
    results: list[list[np.ndarray]] = [[] for _ in outputs]
    for row in np.asarray(z, np.float32):
        interp.set_tensor(inputs[0]["index"], row.reshape(1, -1))
        interp.invoke()
        for k, detail in enumerate(outputs):
            results[k].append(interp.get_tensor(detail["index"])[0].copy())
    return [np.stack(r) for r in results], backend


@dataclass(frozen=True)
class OutputMap:
    """Where the probabilities and the hidden layer are in a converted model."""

    input: TensorRef
    probabilities: TensorRef
    hidden: TensorRef
    max_deviation: float
    """largest Keras/TFLite difference seen (probabilities absolute, hidden relative)"""
    backend: str


def identify_outputs(
    model: bytes, z: np.ndarray, keras_probs: np.ndarray, keras_hidden: np.ndarray, *, tolerance: float
) -> OutputMap:
    """Match the TFLite outputs to the Keras ones on inputs ``z``; fail unless they agree within ``tolerance``."""
    outs, backend = run_tflite(model, z)
    interp = load_interpreter(model, preferred=VERIFY_BACKEND)
    in_detail = interp.get_input_details()[0]
    out_details = interp.get_output_details()
    if not backend.startswith(VERIFY_BACKEND):
        log.warning("verified the conversion with %s, not %s: install the edge extra", backend, VERIFY_BACKEND)

    def best(expected: np.ndarray, relative: bool, exclude: int | None) -> tuple[int, float]:
        found = [
            (output_deviation(out, expected, relative=relative), k)
            for k, out in enumerate(outs)
            if k != exclude and out.shape == expected.shape
        ]
        if not found:
            shapes = [list(o.shape[1:]) for o in outs]
            raise TrainingError(
                "conversion_mismatch", f"no TFLite output of width {expected.shape[1]} (outputs: {shapes})"
            )
        dev, k = min(found)
        return k, dev

    p_index, p_dev = best(np.asarray(keras_probs), False, None)
    h_index, h_dev = best(np.asarray(keras_hidden), True, p_index)
    worst = max(p_dev, h_dev)
    if not worst <= tolerance:
        raise TrainingError(
            "conversion_mismatch",
            f"TFLite and Keras disagree by {worst:.3g} (probabilities {p_dev:.3g}, hidden {h_dev:.3g}) "
            f"> {tolerance:.3g} on {len(z)} inputs",
        )

    def ref(detail: dict[str, Any], index: int) -> TensorRef:
        return TensorRef(index=index, name=str(detail["name"]), shape=[int(s) for s in detail["shape"]])

    log.info(
        "TFLite outputs: probabilities at %d (%s), hidden at %d (%s); max deviation from Keras %.3g (%s)",
        p_index,
        out_details[p_index]["name"],
        h_index,
        out_details[h_index]["name"],
        worst,
        backend,
    )
    return OutputMap(
        input=ref(in_detail, 0),
        probabilities=ref(out_details[p_index], p_index),
        hidden=ref(out_details[h_index], h_index),
        max_deviation=worst,
        backend=backend,
    )

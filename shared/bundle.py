"""Model bundle (Contract, ARCHITECTURE §4): manifest schema, packing, and complete verification.

A bundle is a ``.tar`` (or a directory) holding exactly ``model.tflite``, ``manifest.json`` and
``signature``. The signature is Ed25519 over the manifest bytes, and the manifest carries the
model's SHA-256, so one signature covers everything. :func:`load_bundle` checks, in order: the
archive layout and sizes, the manifest schema, the model hash, the signature against pinned keys,
and (with ``check_tensors``) the model's tensor shapes against the manifest, which also says
which output index holds the probabilities and which the monitored hidden layer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.signing import PublicKey, SignatureError, verify

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature"
MEMBERS = (MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE)
MAX_MODEL_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SIGNATURE_BYTES = 4096


class BundleError(ValueError):
    """A bundle that must not be used. ``reason`` is a stable code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Histogram(_Strict):
    """Counts on fixed bin edges (``len(edges) == len(counts) + 1``)."""

    edges: list[float]
    counts: list[int]

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.edges) != len(self.counts) + 1 or len(self.counts) < 1:
            raise ValueError("a histogram needs len(edges) == len(counts) + 1 >= 2")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("histogram edges must increase strictly")
        return self


class FeatureReference(_Strict):
    """Reference statistics of one input feature, in physical units."""

    name: str
    mean: float
    std: float
    min: float
    max: float
    histogram: Histogram


class CoactivationReference(_Strict):
    """Rare co-activation pairs and how many of them fire per record on the reference data."""

    threshold: float = Field(description="joint firing frequency below which a pair counts as rare")
    pair_mask_b64: str = Field(description="np.packbits of the strict upper triangle (i<j, row-major)")
    n_pairs: int
    count_histogram: Histogram
    mean: float
    p99: float


class PcaReference(_Strict):
    """Linear autoencoder on normalised inputs: reconstruction error reference."""

    components: list[list[float]] = Field(description="k x n_features orthonormal rows")
    error_histogram: Histogram
    error_p99: float


class Decorrelation(_Strict):
    """Seconds of one vehicle's stream that one independent record is worth, measured on the reference drives.

    A window spanning ``T`` seconds of one vehicle holds at most ``T / seconds`` independent looks at a
    quantity, however many records it has: its own records estimate their autocorrelation around the
    window's mean and cannot see what moves slower than the window (cabin pressure, temperature, the
    mix of events). Monitoring caps each window's effective sample sizes with it.
    """

    spacing_s: float = Field(gt=0, description="record spacing of the drives it was measured on (its resolution)")
    features: list[float] = Field(description="per feature, in the manifest's feature order")
    classes: float = Field(gt=0, description="predicted class (the slowest class indicator)")
    confidence: float = Field(gt=0, description="calibrated top-class confidence")
    pca_error: float = Field(gt=0)
    coactivation: float = Field(gt=0, description="rare co-activation count")


class ReferenceProfile(_Strict):
    """What the training data looked like, for drift and out-of-region checks."""

    n_samples: int
    features: list[FeatureReference]
    class_priors: list[float]
    confidence_histogram: Histogram
    activation_frequency: list[float]
    coactivation: CoactivationReference
    pca: PcaReference
    decorrelation: Decorrelation | None = Field(
        None, description="integrated autocorrelation times on time-ordered reference drives (absent: unknown)"
    )


class TensorRef(_Strict):
    """One model tensor: its index in the interpreter's details, its name and shape."""

    index: int = Field(ge=0, description="position in get_input_details()/get_output_details()")
    name: str
    shape: list[int]


class Normalisation(_Strict):
    """Inputs are fed to the model as ``(x - mean) / std``."""

    mean: list[float]
    std: list[float]


class Calibration(_Strict):
    """Temperature scaling of the probabilities (``softmax(log p / T)``)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)


class GoldenCase(_Strict):
    """An input in physical units and the outputs the bundle must reproduce on it."""

    input: list[float]
    probabilities: list[float]
    hidden: list[float]


class Compatibility(_Strict):
    """Which devices may install the bundle."""

    hardware_profiles: list[str] = Field(default_factory=lambda: ["*"])
    min_agent_version: str = "0.1.0"


class TrainingInfo(_Strict):
    """Where the model came from."""

    dataset_version: str
    dataset_sha256: str | None = None
    rows: int
    code_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Manifest(_Strict):
    """``manifest.json`` of a bundle."""

    schema_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
    created_at: datetime
    description: str = ""
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_bytes: int = Field(gt=0)
    features: list[str] = Field(min_length=1)
    normalisation: Normalisation
    labels: list[str] = Field(min_length=2)
    input: TensorRef
    probabilities: TensorRef
    hidden: TensorRef
    calibration: Calibration
    reference: ReferenceProfile
    golden: list[GoldenCase] = Field(min_length=1)
    golden_tolerance: float = Field(gt=0, default=1e-4)
    training: TrainingInfo
    parent_version: str | None = None
    compatibility: Compatibility = Field(default_factory=Compatibility)

    @property
    def n_hidden(self) -> int:
        """Units in the monitored hidden layer."""
        return self.hidden.shape[-1]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        nf, nc, nh = len(self.features), len(self.labels), self.hidden.shape[-1]
        if len(set(self.features)) != nf or len(set(self.labels)) != nc:
            raise ValueError("feature and label names must be unique")
        if len(self.normalisation.mean) != nf or len(self.normalisation.std) != nf:
            raise ValueError("normalisation needs one mean and std per feature")
        if any(not s > 0 for s in self.normalisation.std):
            raise ValueError("normalisation std must be positive")
        if self.input.shape != [1, nf]:
            raise ValueError(f"input shape {self.input.shape} must be [1, {nf}]")
        if self.probabilities.shape != [1, nc]:
            raise ValueError(f"probabilities shape {self.probabilities.shape} must be [1, {nc}]")
        if len(self.hidden.shape) != 2 or self.hidden.shape[0] != 1 or nh < 1:
            raise ValueError(f"hidden shape {self.hidden.shape} must be [1, units]")
        if self.probabilities.index == self.hidden.index:
            raise ValueError("probabilities and hidden must be different outputs")
        ref = self.reference
        if [f.name for f in ref.features] != self.features:
            raise ValueError("reference features must match the feature order")
        if len(ref.class_priors) != nc or len(ref.activation_frequency) != nh:
            raise ValueError("reference class priors / activation frequencies have the wrong length")
        if ref.coactivation.n_pairs != nh * (nh - 1) // 2:
            raise ValueError("co-activation mask must cover every pair of hidden units")
        if any(len(row) != nf for row in ref.pca.components):
            raise ValueError("PCA components must have one weight per feature")
        if ref.decorrelation is not None and (
            len(ref.decorrelation.features) != nf or not all(t > 0 for t in ref.decorrelation.features)
        ):
            raise ValueError("decorrelation needs one positive time per feature")
        for case in self.golden:
            if len(case.input) != nf or len(case.probabilities) != nc or len(case.hidden) != nh:
                raise ValueError("golden cases must match the input and output sizes")
        return self


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: manifest, model bytes and the id of the key that signed it."""

    manifest: Manifest
    model: bytes
    manifest_bytes: bytes
    signature: bytes
    key_id: str

    @property
    def sha256(self) -> str:
        """The model's SHA-256 (the registry's content address is of the tar)."""
        return self.manifest.model_sha256


def rare_pair_indices(coact: CoactivationReference, n_hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the rare-pair mask into index arrays ``(i, j)`` with ``i < j``."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(coact.pair_mask_b64), np.uint8))[: coact.n_pairs]
    iu, ju = np.triu_indices(n_hidden, k=1)
    mask = bits.astype(bool)
    return iu[mask].astype(np.int32), ju[mask].astype(np.int32)


def pack_pair_mask(mask: np.ndarray) -> str:
    """Inverse of :func:`rare_pair_indices` for a boolean ``[n_hidden, n_hidden]`` matrix."""
    iu, ju = np.triu_indices(mask.shape[0], k=1)
    return base64.b64encode(np.packbits(mask[iu, ju].astype(np.uint8)).tobytes()).decode()


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log p / T)`` along the last axis."""
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


# -------------------------------------------------------------------------------- read / write


def _read_members(source: Path | bytes) -> dict[str, bytes]:
    limits = {MODEL_FILE: MAX_MODEL_BYTES, MANIFEST_FILE: MAX_MANIFEST_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES}
    found: dict[str, bytes] = {}
    if isinstance(source, Path) and source.is_dir():
        for name in MEMBERS:
            path = source / name
            if not path.is_file():
                raise BundleError("missing_member", f"{source} lacks {name}")
            if path.stat().st_size > limits[name]:
                raise BundleError("member_too_large", f"{name} is over {limits[name]} bytes")
            found[name] = path.read_bytes()
        return found
    try:
        fileobj = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise BundleError("unreadable", str(exc)) from None
    try:
        with fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name not in limits:
                    raise BundleError("unexpected_member", f"archive holds {info.name!r}; allowed: {MEMBERS}")
                if not info.isreg():
                    raise BundleError("unexpected_member", f"{name} is not a regular file")
                if info.size > limits[name]:
                    raise BundleError("member_too_large", f"{name} is {info.size} bytes > {limits[name]}")
                if name in found:
                    raise BundleError("unexpected_member", f"{name} appears twice")
                extracted = tar.extractfile(info)
                assert extracted is not None
                found[name] = extracted.read()
    except tarfile.TarError as exc:
        raise BundleError("bad_archive", f"not a tar archive: {exc}") from None
    missing = [m for m in MEMBERS if m not in found]
    if missing:
        raise BundleError("missing_member", f"archive lacks {missing}")
    return found


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest JSON; raise :class:`BundleError` naming the first problem."""
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise BundleError("bad_manifest", f"{where}: {first['msg']} ({exc.error_count()} problems)") from None


def load_bundle(source: Path | bytes, trusted: list[PublicKey], *, check_tensors: bool = True) -> Bundle:
    """Read and completely verify a bundle (tar path, tar bytes or directory)."""
    members = _read_members(source)
    manifest = parse_manifest(members[MANIFEST_FILE])
    model = members[MODEL_FILE]
    digest = hashlib.sha256(model).hexdigest()
    if digest != manifest.model_sha256 or len(model) != manifest.model_bytes:
        raise BundleError("hash_mismatch", f"model.tflite has sha256 {digest}, manifest says {manifest.model_sha256}")
    try:
        key_id = verify(members[MANIFEST_FILE], members[SIGNATURE_FILE], trusted)
    except SignatureError as exc:
        # The cause keeps the signature's own reason (unknown_key, bad_signature...) for the updater.
        raise BundleError("bad_signature", str(exc)) from exc
    bundle = Bundle(manifest, model, members[MANIFEST_FILE], members[SIGNATURE_FILE], key_id)
    if check_tensors:
        check_tensor_shapes(bundle)
    return bundle


def write_bundle(path: Path, model: bytes, manifest_bytes: bytes, signature: bytes) -> None:
    """Write a bundle tar with deterministic member metadata (same inputs, same bytes)."""
    Path(path).write_bytes(bundle_bytes(model, manifest_bytes, signature))


def bundle_bytes(model: bytes, manifest_bytes: bytes, signature: bytes) -> bytes:
    """The bundle tar :func:`write_bundle` writes, as bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_FILE, manifest_bytes), (MODEL_FILE, model), (SIGNATURE_FILE, signature)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def manifest_json(manifest: Manifest | dict[str, Any]) -> bytes:
    """Canonical manifest bytes (sorted keys) to sign and store."""
    doc = manifest.model_dump(mode="json") if isinstance(manifest, Manifest) else manifest
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- tensors / golden


def check_tensor_shapes(bundle: Bundle, interpreter: Any | None = None) -> Any:
    """Load the model and check the input and both outputs against the manifest; return the interpreter."""
    from shared.interpreter import load_interpreter

    m = bundle.manifest
    try:
        interp = interpreter or load_interpreter(bundle.model)
    except (ValueError, RuntimeError) as exc:
        raise BundleError("bad_model", f"the TFLite runtime rejects model.tflite: {exc}") from None
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or m.input.index != 0:
        raise BundleError("bad_tensors", f"model has {len(inputs)} inputs; the manifest expects one at index 0")
    checks = [("input", inputs, m.input), ("probabilities", outputs, m.probabilities), ("hidden", outputs, m.hidden)]
    for what, details, ref in checks:
        if ref.index >= len(details):
            raise BundleError("bad_tensors", f"{what} index {ref.index} but the model has {len(details)}")
        shape = [int(x) for x in details[ref.index]["shape"]]
        if shape != ref.shape:
            raise BundleError("bad_tensors", f"{what} tensor has shape {shape}, manifest says {ref.shape}")
    return interp


def run_golden(bundle: Bundle, interpreter: Any | None = None) -> float:
    """Run the golden inputs; return the largest absolute deviation from the expected outputs.

    Raises :class:`BundleError` (``golden_mismatch``) when it exceeds the manifest's tolerance or
    an output is not finite: the on-device self-test and the trainer's post-conversion check.
    """
    m = bundle.manifest
    interp = check_tensor_shapes(bundle, interpreter)
    inp = interp.get_input_details()[0]["index"]
    out_p = interp.get_output_details()[m.probabilities.index]["index"]
    out_h = interp.get_output_details()[m.hidden.index]["index"]
    mean = np.asarray(m.normalisation.mean, np.float32)
    std = np.asarray(m.normalisation.std, np.float32)
    worst = 0.0
    for case in m.golden:
        x = ((np.asarray(case.input, np.float32) - mean) / std).reshape(1, -1)
        interp.set_tensor(inp, x)
        interp.invoke()
        probs = interp.get_tensor(out_p)[0]
        hidden = interp.get_tensor(out_h)[0]
        if not (np.isfinite(probs).all() and np.isfinite(hidden).all()):
            raise BundleError("golden_mismatch", "model produced NaN or Inf on a golden input")
        dev = max(
            float(np.abs(probs - np.asarray(case.probabilities)).max()),
            float(np.abs(hidden - np.asarray(case.hidden)).max() / max(1.0, float(np.abs(case.hidden).max()))),
        )
        worst = max(worst, dev)
    if not math.isfinite(worst) or worst > m.golden_tolerance:
        raise BundleError("golden_mismatch", f"deviation {worst:.3g} > tolerance {m.golden_tolerance:.3g}")
    return worst

"""Reference profile of a model's training data (pure numpy, no TensorFlow).

Everything monitoring compares live windows against comes from here, so the same functions also
serve monitoring: :func:`bin_counts` puts live values on the reference edges, :func:`active_units`
and :func:`rare_coactivation_counts` score records, :func:`reconstruction_error` applies the PCA
basis.

Binning convention (every histogram of the manifest)
----------------------------------------------------
Edges ``e_0 < e_1 < ... < e_B`` are finite (JSON has no infinities). Bin ``k`` holds
``e_k <= x < e_{k+1}``; the outer bins are open-ended: a value below ``e_0`` counts in bin 0 and a
value at or above ``e_{B-1}`` in bin ``B-1``. So a live value outside the training range still
lands in a bin (the PSI of a window whose values all lie beyond the range is then large, as it
should be), and the outer edges, the training range widened by 5 %, only document that range.
Non-finite values (NaN: a missing input) are not counted; monitoring counts them separately.

Rare co-activation (Myllyaho et al. 2022)
-----------------------------------------
Hidden unit ``i`` is *active* when its activation is > 0 (ReLU). A pair ``i < j`` is *rare* when
the units fire together in fewer than ``threshold`` (default 1 %) of the training records although
each fires on its own in at least ``sqrt(threshold)`` (10 %) of them. The second condition makes
the rarity meaningful: two units that each fire in >= 10 % of the records would, if independent,
fire together in >= 1 % of them, so a joint frequency below 1 % means the network uses them for
different regions of the input space (they are anti-correlated), not merely that one unit is
nearly dead. The number of rare pairs firing together in a record is its rare co-activation
count; inputs unlike the training data fire many more of them.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from shared.bundle import (
    CoactivationReference,
    Decorrelation,
    FeatureReference,
    Histogram,
    PcaReference,
    ReferenceProfile,
    pack_pair_mask,
)

log = logging.getLogger(__name__)

DEFAULT_BINS = 20
OUTER_MARGIN = 0.05
RARE_PAIR_THRESHOLD = 0.01
PCA_VARIANCE = 0.95


# ------------------------------------------------------------------------------ decorrelation


def integrated_autocorrelation_time(series: list[np.ndarray], max_lag_fraction: float = 0.5) -> float:
    """``1 + 2 Σ_k ρ_k`` (in records) of one stationary quantity observed as several regular series.

    The autocovariance pools every series around their common mean (so offsets between drives count
    as slow variation, which a single vehicle's window cannot see either) and is computed with the
    FFT up to ``max_lag_fraction`` of the shortest series. The sum is Geyer's initial monotone
    sequence estimator: pairs ``Γ_m = ρ_2m + ρ_2m+1`` are summed while positive, each at most the one
    before, and ``τ = 2 Σ Γ_m - 1`` (at least 1). A constant quantity has ``τ = 1``.

    Geyer, C. J. (1992). Practical Markov chain Monte Carlo. Statistical Science 7(4).
    """
    parts = [np.asarray(x, dtype=np.float64) for x in series if np.asarray(x).size >= 8]
    if not parts:
        return 1.0
    mean = float(np.concatenate(parts).mean())
    max_lag = max(2, int(min(x.size for x in parts) * max_lag_fraction))
    acov = np.zeros(max_lag)
    pairs = np.zeros(max_lag)
    for x in parts:
        c = x - mean
        size = 1 << int(2 * c.size - 1).bit_length()
        f = np.fft.rfft(c, size)
        full = np.fft.irfft(f * np.conj(f), size)[:max_lag]
        acov += full
        pairs += np.maximum(c.size - np.arange(max_lag), 0)
    gamma0 = acov[0] / pairs[0]
    if not gamma0 > 1e-300:
        return 1.0
    rho = (acov / pairs) / gamma0
    tau, previous = 0.0, math.inf
    for m in range(len(rho) // 2):
        g = min(rho[2 * m] + rho[2 * m + 1], previous)
        if g <= 0:
            break
        tau += g
        previous = g
    return max(2.0 * tau - 1.0, 1.0)


def decorrelation_seconds(values: np.ndarray, drive: np.ndarray, ts: np.ndarray) -> tuple[float, np.ndarray]:
    """``(spacing_s, seconds per independent record)`` of each column of ``values`` ``[n, k]`` on time-ordered drives.

    ``drive`` names the drive (vehicle) of each row and ``ts`` its time in seconds; rows are ordered by
    (drive, ts) here. The spacing is the median step between consecutive rows of a drive; a drive whose
    steps differ from it by more than 1 % is split there (a gap). The time of a column is the spacing
    times its integrated autocorrelation time.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    d = np.asarray(drive)
    t = np.asarray(ts, dtype=np.float64)
    if not (x.shape[0] == d.shape[0] == t.shape[0]) or x.shape[0] < 16:
        raise ValueError("values, drive and ts need one entry per row, at least 16 rows")
    if not np.isfinite(t).all():
        raise ValueError("ts must be finite")
    order = np.lexsort((t, d))
    x, d, t = x[order], d[order], t[order]
    step = np.diff(t)
    same = d[1:] == d[:-1]
    if not (same & (step > 0)).any():
        raise ValueError("no drive holds two records at different times")
    spacing = float(np.median(step[same & (step > 0)]))
    cut = np.flatnonzero(~same | (np.abs(step - spacing) > 0.01 * spacing)) + 1
    bounds = np.concatenate([[0], cut, [x.shape[0]]])
    seconds = np.empty(x.shape[1])
    for col in range(x.shape[1]):
        series = [x[lo:hi, col] for lo, hi in itertools.pairwise(bounds)]
        seconds[col] = spacing * integrated_autocorrelation_time(series)
    return spacing, seconds


# --------------------------------------------------------------------------------- histograms


def quantile_edges(
    values: np.ndarray, bins: int = DEFAULT_BINS, *, lower: float | None = None, upper: float | None = None
) -> np.ndarray:
    """Strictly increasing finite bin edges on the quantiles of ``values`` (ties merged).

    The inner edges are the ``k / bins`` quantiles; the outer edges are the minimum and maximum
    widened by 5 % of the range (or fixed to ``lower``/``upper`` when the quantity is bounded, e.g.
    a confidence in [0, 1]). Equal quantiles (a value repeated in many records) collapse into one
    edge, so there may be fewer than ``bins`` bins; there is always at least one.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("cannot place bin edges on no finite values")
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    # A constant quantity still needs a bin of positive width around its value.
    pad = OUTER_MARGIN * span if span > 0 else max(OUTER_MARGIN * abs(hi), 1.0)
    first = lo - pad if lower is None else float(lower)
    last = hi + pad if upper is None else float(upper)
    if not first < last:
        raise ValueError(f"lower edge {first} must be below upper edge {last}")
    inner = np.quantile(x, np.arange(1, bins) / bins) if bins > 1 else np.empty(0)
    inner = inner[(inner > first) & (inner < last)]
    return np.unique(np.concatenate([[first], inner, [last]]))


FLOAT16_MAX = float(np.finfo(np.float16).max)


def as_wire(values: np.ndarray) -> np.ndarray:
    """``values`` as the collector sees them when features travel as float16 (the codec's usual form).

    Values beyond float16's range are left as they are (the codec sends such a block as float32).
    """
    x = np.asarray(values, dtype=np.float64)
    fits = np.isfinite(x) & (np.abs(x) <= FLOAT16_MAX)
    with np.errstate(over="ignore"):
        return np.where(fits, x.astype(np.float16).astype(np.float64), x)


def wire_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Quantile edges of a feature, each inner edge moved to the midpoint between two float16 neighbours.

    The agent usually sends features as float16 (shared.codec), so the collector sees every value
    rounded to the float16 grid, whose step can exceed a quantile bin's width (pressure near
    1,000 hPa moves in steps of 0.5). Edges are therefore placed on the float16-rounded training
    values, and every inner edge at the midpoint below the smallest grid value at or above it. A
    value then falls into the same bin whether it arrives as float32 or rounded to float16, and the
    reference counts (of the rounded values) are what a stationary stream reproduces; otherwise a
    stationary device shows drift from rounding alone. A value exactly at a midpoint (CSV data with
    two decimals hits them) goes where float16's round-half-to-even sends it.
    """
    wire = as_wire(values)
    edges = quantile_edges(wire, bins)
    inner = edges[1:-1]
    on_grid = np.abs(inner) <= FLOAT16_MAX
    g = inner[on_grid].astype(np.float16)
    g = np.where(g.astype(np.float64) < inner[on_grid], np.nextafter(g, np.float16(np.inf)), g)
    below = np.nextafter(g, np.float16(-np.inf))
    mid = (g.astype(np.float64) + below.astype(np.float64)) / 2.0
    # A value exactly at the midpoint rounds to the neighbour with the even significand (IEEE
    # round-half-to-even): when that is the lower one, the edge sits just above the midpoint.
    odd = (g.view(np.uint16) & 1).astype(bool)
    inner = inner.copy()
    inner[on_grid] = np.where(odd, np.nextafter(mid, np.inf), mid)
    inner = inner[(inner > edges[0]) & (inner < edges[-1])]
    return np.unique(np.concatenate([[edges[0]], inner, [edges[-1]]]))


def integer_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Half-integer edges for a count: one bin per value when at most ``bins`` values occur, else quantile bins.

    A count concentrated on 0 (the usual rare co-activation count) thus keeps 0, 1, 2, ... apart
    instead of merging them into one quantile bin.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("cannot place bin edges on no finite values")
    lo, hi = math.floor(x.min()), math.ceil(x.max())
    if hi - lo + 1 <= bins:
        cuts = np.arange(lo, hi + 1, dtype=np.float64)
    else:
        cuts = np.unique(np.ceil(np.quantile(x, np.arange(0, bins) / bins)))
    return np.concatenate([cuts - 0.5, [float(hi) + 0.5]])


def bin_index(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Bin of each value under the module's convention (outer bins open-ended); -1 for non-finite."""
    e = np.asarray(edges, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(e[1:-1], x, side="right")
    return np.where(np.isfinite(x), idx, -1)


def bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Counts of ``values`` per bin (non-finite values skipped); mergeable by addition."""
    e = np.asarray(edges, dtype=np.float64)
    idx = bin_index(np.asarray(values).ravel(), e)
    return np.bincount(idx[idx >= 0], minlength=len(e) - 1).astype(np.int64)


def histogram(values: np.ndarray, edges: np.ndarray | list[float]) -> Histogram:
    """A manifest :class:`Histogram` of ``values`` on ``edges``."""
    e = np.asarray(edges, dtype=np.float64)
    return Histogram(edges=e.tolist(), counts=bin_counts(values, e).tolist())


# ----------------------------------------------------------------------------- per feature


def feature_references(x: np.ndarray, names: list[str], bins: int = DEFAULT_BINS) -> list[FeatureReference]:
    """Mean, std, range and quantile histogram (on float16 wire edges: :func:`wire_edges`) of every column of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"x has shape {x.shape}; expected [n, {len(names)}]")
    refs = []
    for col, name in enumerate(names):
        v = x[:, col]
        refs.append(
            FeatureReference(
                name=name,
                mean=float(v.mean()),
                std=float(v.std()),
                min=float(v.min()),
                max=float(v.max()),
                histogram=histogram(as_wire(v), wire_edges(v, bins)),
            )
        )
    return refs


def class_priors(labels: np.ndarray, n_classes: int) -> list[float]:
    """Share of each class index ``0..n_classes-1`` among ``labels``."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        raise ValueError("no labels")
    return (np.bincount(y, minlength=n_classes)[:n_classes] / y.size).tolist()


# ------------------------------------------------------------------------------ activations


def active_units(hidden: np.ndarray) -> np.ndarray:
    """Binary firing pattern: activation > 0 (what the device bit-packs into every record)."""
    return np.asarray(hidden) > 0


def activation_frequency(active: np.ndarray) -> np.ndarray:
    """Share of records in which each unit fires."""
    return np.asarray(active, dtype=bool).mean(axis=0)


def joint_frequency(active: np.ndarray) -> np.ndarray:
    """``[h, h]`` matrix: share of records in which units ``i`` and ``j`` fire together."""
    a = np.asarray(active, dtype=np.float64)
    return (a.T @ a) / max(1, a.shape[0])


def rare_pair_mask(
    active: np.ndarray, threshold: float = RARE_PAIR_THRESHOLD, min_unit_frequency: float | None = None
) -> np.ndarray:
    """Boolean ``[h, h]`` matrix, true at ``i < j`` for rare pairs (see the module docstring).

    ``min_unit_frequency`` defaults to ``sqrt(threshold)``: the frequency at which two independent
    units would fire together exactly at the threshold.
    """
    if not 0 < threshold < 1:
        raise ValueError("threshold must lie in (0, 1)")
    a = np.asarray(active, dtype=bool)
    floor = math.sqrt(threshold) if min_unit_frequency is None else min_unit_frequency
    freq = activation_frequency(a)
    common = freq >= floor
    rare = (joint_frequency(a) < threshold) & common[:, None] & common[None, :]
    return np.triu(rare, k=1)


def rare_coactivation_counts(active: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per record, how many rare pairs (true entries of the upper-triangular ``mask``) fire together."""
    i, j = np.nonzero(np.triu(np.asarray(mask, dtype=bool), k=1))
    a = np.asarray(active, dtype=bool)
    if i.size == 0:
        return np.zeros(a.shape[0], dtype=np.int64)
    return (a[:, i] & a[:, j]).sum(axis=1).astype(np.int64)


def coactivation_reference(
    train_active: np.ndarray,
    held_out_active: np.ndarray,
    threshold: float = RARE_PAIR_THRESHOLD,
    bins: int = DEFAULT_BINS,
) -> tuple[CoactivationReference, np.ndarray]:
    """Rare pairs from the training records; their count distribution on held-out records.

    The count is taken on records the pairs were not chosen on: on the training records it is
    low by construction, and every healthy live window would look worse than that reference.
    Returns the manifest entry and the boolean mask.
    """
    mask = rare_pair_mask(train_active, threshold)
    h = mask.shape[0]
    if train_active.shape[0] * threshold < 5:
        log.warning(
            "only %d training records: a joint frequency of %.3g is under 5 records, the rare-pair mask is noisy",
            train_active.shape[0],
            threshold,
        )
    counts = rare_coactivation_counts(held_out_active, mask)
    ref = CoactivationReference(
        threshold=threshold,
        pair_mask_b64=pack_pair_mask(mask),
        n_pairs=h * (h - 1) // 2,
        count_histogram=histogram(counts, integer_edges(counts, bins)),
        mean=float(counts.mean()),
        p99=float(np.quantile(counts, 0.99)),
    )
    return ref, mask


# ------------------------------------------------------------------------------------- PCA


def fit_pca(z: np.ndarray, variance: float = PCA_VARIANCE) -> np.ndarray:
    """Orthonormal ``[k, n_features]`` basis of the fewest components explaining ``variance``.

    ``z`` are normalised inputs, centred by the normalisation itself (mean 0 on the training data),
    so the basis is taken without further centring and no mean needs storing: the device applies it
    to exactly what the model sees. Signs are fixed (largest weight of each component positive) so
    the same data always gives the same basis.
    """
    if not 0 < variance <= 1:
        raise ValueError("variance must lie in (0, 1]")
    z = np.asarray(z, dtype=np.float64)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    power = s**2
    total = power.sum()
    if total <= 0:
        return vt[:1]
    k = int(np.searchsorted(np.cumsum(power) / total, variance - 1e-12) + 1)
    basis = vt[: min(k, vt.shape[0])]
    signs = np.sign(basis[np.arange(basis.shape[0]), np.abs(basis).argmax(axis=1)])
    return basis * signs[:, None]


def reconstruction_error(z: np.ndarray, components: np.ndarray | list[list[float]]) -> np.ndarray:
    """Mean squared residual per record after projecting onto the basis and back."""
    v = np.asarray(components, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    residual = z - (z @ v.T) @ v
    return (residual**2).mean(axis=1)


def pca_reference(
    z_train: np.ndarray, z_held_out: np.ndarray, variance: float = PCA_VARIANCE, bins: int = DEFAULT_BINS
) -> PcaReference:
    """PCA basis fitted on normalised training inputs; error distribution on held-out inputs."""
    components = fit_pca(z_train, variance)
    err = reconstruction_error(z_held_out, components)
    return PcaReference(
        components=components.tolist(),
        error_histogram=histogram(err, quantile_edges(err, bins, lower=0.0)),
        error_p99=float(np.quantile(err, 0.99)),
    )


# --------------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class ReferenceInputs:
    """What the profile is computed from: one split the model was fitted on, one it was not."""

    x_train: np.ndarray
    """training inputs, physical units"""
    z_train: np.ndarray
    """training inputs, normalised"""
    y_train: np.ndarray
    """training class indexes"""
    hidden_train: np.ndarray
    """hidden activations on the training inputs"""
    z_held_out: np.ndarray
    """held-out (validation + test) inputs, normalised"""
    hidden_held_out: np.ndarray
    confidence_held_out: np.ndarray
    """calibrated top-class confidence on the held-out inputs"""
    pred_held_out: np.ndarray | None = None
    """predicted class indexes on the held-out inputs (None: the training labels' shares are the priors)"""
    x_reference: np.ndarray | None = None
    """inputs of independent deployment-like records (other drives, other vehicles), physical units; when
    given, the input histograms, model-score distributions and class priors describe these instead"""
    z_reference: np.ndarray | None = None
    hidden_reference: np.ndarray | None = None
    confidence_reference: np.ndarray | None = None
    pred_reference: np.ndarray | None = None
    drive_reference: np.ndarray | None = None
    """the drive (vehicle) of each reference record, when the reference file says (``drive`` column)"""
    ts_reference: np.ndarray | None = None
    """the time of each reference record in seconds (``ts_s`` column): with the drive, the decorrelation
    times of the monitored quantities are measured"""


def build_reference_profile(
    data: ReferenceInputs,
    feature_names: list[str],
    n_classes: int,
    *,
    bins: int = DEFAULT_BINS,
    rare_threshold: float = RARE_PAIR_THRESHOLD,
    pca_variance: float = PCA_VARIANCE,
) -> ReferenceProfile:
    """The manifest's reference profile.

    Activation frequencies, the rare-pair mask and the PCA basis describe the training records. The
    distributions of per-record *scores* of the model (calibrated confidence, rare co-activation
    count, reconstruction error) and the class priors (the predicted-class mix) are taken on
    held-out records, because a model scores the records it was fitted on better than any new ones,
    and monitoring compares live, unseen records against these distributions. Input histograms
    describe the training records.

    With ``x_reference`` (records of independent drives or vehicles), input histograms, score
    distributions and priors describe those instead. A random held-out split of one recording is not
    independent of its training split when the signals are autocorrelated (neighbouring records are
    near-copies), and one recording holds one realisation of every slow process (a start-up
    transient, one pressure trajectory): a fleet compared with it drifts on every device. The
    alarm-storm experiment in docs/MONITORING.md measured both.
    """
    ref = data.x_reference is not None
    if ref and any(
        v is None for v in (data.z_reference, data.hidden_reference, data.confidence_reference, data.pred_reference)
    ):
        raise ValueError("x_reference needs z_reference, hidden_reference, confidence_reference and pred_reference")
    x_live = data.x_reference if ref else data.x_train
    z_scores = data.z_reference if ref else data.z_held_out
    hidden_scores = data.hidden_reference if ref else data.hidden_held_out
    conf_scores = data.confidence_reference if ref else data.confidence_held_out
    pred_scores = data.pred_reference if ref else data.pred_held_out
    assert x_live is not None and z_scores is not None and hidden_scores is not None and conf_scores is not None
    coactivation, rare_mask = coactivation_reference(
        active_units(data.hidden_train), active_units(hidden_scores), rare_threshold, bins
    )
    conf = np.asarray(conf_scores, dtype=np.float64)
    # Monitoring compares the PREDICTED classes of live records with these priors, so they are the
    # model's predicted mix on unseen records (its confusion alone moves it off the label mix).
    priors = class_priors(data.y_train if pred_scores is None else pred_scores, n_classes)
    pca = pca_reference(data.z_train, z_scores, pca_variance, bins)
    decorrelation = None
    if ref and data.drive_reference is not None and data.ts_reference is not None:
        assert data.pred_reference is not None
        decorrelation = decorrelation_reference(
            x_live,
            pred=data.pred_reference,
            n_classes=n_classes,
            confidence=conf,
            pca_error=reconstruction_error(z_scores, pca.components),
            coactivation=rare_coactivation_counts(active_units(hidden_scores), rare_mask),
            drive=data.drive_reference,
            ts=data.ts_reference,
        )
    return ReferenceProfile(
        n_samples=int(x_live.shape[0]),
        features=feature_references(x_live, feature_names, bins),
        class_priors=priors,
        confidence_histogram=histogram(conf, quantile_edges(conf, bins, lower=0.0, upper=1.0)),
        activation_frequency=activation_frequency(active_units(data.hidden_train)).tolist(),
        coactivation=coactivation,
        pca=pca,
        decorrelation=decorrelation,
    )


def decorrelation_reference(
    x: np.ndarray,
    *,
    pred: np.ndarray,
    n_classes: int,
    confidence: np.ndarray,
    pca_error: np.ndarray,
    coactivation: np.ndarray,
    drive: np.ndarray,
    ts: np.ndarray,
) -> Decorrelation:
    """The reference drives' decorrelation times of every input and model signal (:func:`decorrelation_seconds`).

    The predicted class counts as its slowest class indicator among the classes predicted in at
    least 1 % of the records (a rare class's indicator says little about the mix).
    """
    p = np.asarray(pred)
    shares = np.bincount(p, minlength=n_classes) / max(p.size, 1)
    common = [k for k in range(n_classes) if shares[k] >= 0.01]
    columns = [
        np.asarray(x, dtype=np.float64),
        np.stack([(p == k).astype(np.float64) for k in common], axis=1),
        np.stack([confidence, pca_error, coactivation], axis=1).astype(np.float64),
    ]
    spacing, seconds = decorrelation_seconds(np.concatenate(columns, axis=1), drive, ts)
    nf, nk = columns[0].shape[1], len(common)
    return Decorrelation(
        spacing_s=spacing,
        features=[float(v) for v in seconds[:nf]],
        classes=float(seconds[nf : nf + nk].max()) if nk else spacing,
        confidence=float(seconds[nf + nk]),
        pca_error=float(seconds[nf + nk + 1]),
        coactivation=float(seconds[nf + nk + 2]),
    )

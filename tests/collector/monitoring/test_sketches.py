"""Window sketches: exact counts on hand-built blocks, merging, windows, storage, and the real bundle."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.ingest.bulk import InferenceRows
from collector.monitoring.dependence import LAGS
from collector.monitoring.sketches import (
    RangeLimits,
    ReferenceBins,
    SketchError,
    WindowSketch,
    merge,
    merge_all,
    rollup,
    sketch_block,
    split_by_window,
    window_start,
)
from collector.training.reference import bin_counts, reconstruction_error
from shared.bundle import Manifest, load_bundle, pack_pair_mask
from shared.codec import RecordBlock, decode_batch, encode_batch
from shared.profile import HardwareProfile
from shared.signing import load_public_keys
from tests.shared.test_codec import make_batch, make_block

REPO = Path(__file__).resolve().parents[3]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
NAMES = ["temperature_c", "humidity_pct", "audio_flatness"]
EDGES = [[0.0, 1.0, 2.0, 3.0], [-10.0, 0.0, 10.0], [0.0, 0.5, 1.0, 1.5, 2.0]]
MEAN = [1.0, 0.0, 1.0]
STD = [1.0, 5.0, 0.5]
REF_MEAN = 1.5  # what the agent imputes for a missing input (here unlike the normalisation mean)
COMPONENTS = [[0.6, 0.8, 0.0]]
T0 = 1_759_999_500.0  # a multiple of 10 s and of 900 s: windows start on it


def hist(edges: list[float]) -> dict[str, Any]:
    return {"edges": edges, "counts": [1] * (len(edges) - 1)}


def small_manifest() -> Manifest:
    """Three features of uneven bin counts, three classes, four hidden units."""
    nh = 4
    mask = np.zeros((nh, nh), bool)
    mask[0, 1] = True
    doc = {
        "name": "tiny",
        "version": "1.0.0",
        "created_at": "2026-11-25T00:00:00Z",
        "model_sha256": "0" * 64,
        "model_bytes": 1,
        "features": NAMES,
        "normalisation": {"mean": MEAN, "std": STD},
        "labels": ["a", "b", "c"],
        "input": {"index": 0, "name": "in", "shape": [1, 3]},
        "probabilities": {"index": 1, "name": "p", "shape": [1, 3]},
        "hidden": {"index": 0, "name": "h", "shape": [1, nh]},
        "calibration": {"temperature": 1.0},
        "reference": {
            "n_samples": 10,
            "features": [
                {"name": n, "mean": REF_MEAN, "std": 1.0, "min": e[0], "max": e[-1], "histogram": hist(e)}
                for n, e in zip(NAMES, EDGES, strict=True)
            ],
            "class_priors": [0.3, 0.3, 0.4],
            "confidence_histogram": hist([0.0, 0.5, 0.8, 1.0]),
            "activation_frequency": [0.5] * nh,
            "coactivation": {
                "threshold": 0.01,
                "pair_mask_b64": pack_pair_mask(mask),
                "n_pairs": nh * (nh - 1) // 2,
                "count_histogram": hist([-0.5, 0.5, 1.5, 2.5]),
                "mean": 0.2,
                "p99": 1.0,
            },
            "pca": {"components": COMPONENTS, "error_histogram": hist([0.0, 0.1, 1.0]), "error_p99": 0.5},
        },
        "golden": [{"input": [0.0] * 3, "probabilities": [0.3, 0.3, 0.4], "hidden": [0.0] * nh}],
        "training": {"dataset_version": "t", "rows": 10},
    }
    return Manifest.model_validate(doc)


def block(features: np.ndarray, **changes: Any) -> RecordBlock:
    """A block of ``len(features)`` records, 0.1 s apart from T0, seq from 10, with the given features."""
    n = features.shape[0]
    b = make_block(n, features=3, classes=3)
    base: dict[str, Any] = {
        "ts": T0 + np.arange(n) * 0.1,
        "features": features,
        "pred": np.zeros(n, np.int16),
        "calibrated": np.full(n, 0.5, np.float16),
        "coact": np.zeros(n, np.uint16),
        "sensor_flags": np.zeros(n, np.uint16),
        "label": np.full(n, -1, np.int16),
    }
    base.update(changes)
    return dataclasses.replace(b, **base)


@pytest.fixture(scope="module")
def bins() -> ReferenceBins:
    return ReferenceBins.from_manifest(small_manifest())


# ------------------------------------------------------------------------------ exact counts


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_bins_at_edges_beyond_outer_edges_and_nan(bins: ReferenceBins, dtype: type) -> None:
    # Bin k holds e_k <= x < e_{k+1}; outer bins are open-ended; NaN is counted apart.
    f0 = [-5.0, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 100.0, np.nan]
    f1 = [-11.0, -10.0, -0.5, 0.0, 5.0, 10.0, 11.0, np.nan, np.nan]
    f2 = [0.0, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0, -1.0]
    x: np.ndarray = np.array([f0, f1, f2], dtype=dtype).T
    s = sketch_block(bins, block(x), received_at=T0 + 5)
    assert s.n == 9
    assert s.feature_hist.tolist() == [[3, 1, 4, 0], [3, 4, 0, 0], [3, 1, 2, 3]]
    assert s.feature_nan.tolist() == [1, 2, 0]
    for f, edges in enumerate(EDGES):  # the same convention as the reference's own binning
        assert s.feature_hist[f, : len(edges) - 1].tolist() == bin_counts(x[:, f], edges).tolist()
    assert s.records_missing == 2
    x64 = x.astype(np.float64)
    assert np.allclose(s.feature_sum, np.nansum(x64, axis=0))
    assert np.allclose(s.feature_sumsq, np.nansum(x64**2, axis=0))


def test_classes_labels_and_confidence(bins: ReferenceBins) -> None:
    x = np.zeros((8, 3), np.float32)
    pred = np.array([0, 1, 1, 2, 2, 2, 5, -1], np.int16)  # two predictions outside the 3 classes
    label = np.array([0, 2, -1, 2, 2, -1, 1, 9], np.int16)
    conf = np.array([0.0, 0.5, 0.6, 0.8, 0.9, 1.0, 0.25, 0.75], np.float32)
    s = sketch_block(bins, block(x, pred=pred, label=label, calibrated=conf), received_at=T0)
    assert s.class_counts.tolist() == [1, 2, 3]
    assert s.pred_invalid == 2
    assert (s.labelled, s.correct) == (6, 3)
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0] = 1  # label 0, pred 0
    expected[2, 1] = 1  # label 2, pred 1
    expected[2, 2] = 2
    assert np.array_equal(s.confusion, expected)
    assert s.confidence_hist.tolist() == [2, 3, 3]  # [0, .5) | [.5, .8) | [.8, 1] (outer bin open)
    p = conf.astype(np.float64)
    n, sp, spq = s.confidence_stats
    assert n == 8 and math.isclose(sp, p.sum()) and math.isclose(spq, (p * (1 - p)).sum())


def test_pca_error_and_coactivation_match_a_direct_computation(bins: ReferenceBins) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 1.0, (40, 3)).astype(np.float32)
    x[3, 2] = np.nan  # the agent feeds the model the reference mean instead
    coact = rng.integers(0, 4, 40).astype(np.uint16)
    s = sketch_block(bins, block(x, coact=coact), received_at=T0)
    z = (x.astype(np.float64) - MEAN) / STD
    z[3, 2] = (REF_MEAN - MEAN[2]) / STD[2]
    v = np.array(COMPONENTS)
    err = ((z - z @ v.T @ v) ** 2).mean(axis=1)
    assert math.isclose(s.pca_sum, err.sum(), rel_tol=1e-5)
    assert s.pca_hist.tolist() == [int((err < 0.1).sum()), int((err >= 0.1).sum())]
    assert s.pca_exceed == int((err > 0.5).sum()) > 0
    assert s.coact_hist.tolist() == [int((coact == 0).sum()), int((coact == 1).sum()), int((coact >= 2).sum())]
    assert s.coact_exceed == int((coact > 1).sum()) and s.coact_sum == coact.sum()


def test_data_quality_counters(bins: ReferenceBins) -> None:
    # temperature stuck at 21.5 for six records; humidity out of its 0..100 range twice.
    x = np.array(
        [
            [20.0, 50.0, 0.1],
            [21.5, 50.0, 0.2],
            [21.5, 101.0, 0.3],
            [21.5, -1.0, 0.3],
            [21.5, 50.0, np.nan],
            [21.5, 50.0, np.nan],
            [21.5, 100.0, 0.4],
            [22.0, 0.0, 0.5],
        ],
        np.float32,
    )
    seq = np.array([10, 11, 12, 15, 16, 18, 19, 20], np.uint64)  # holes: 13-14 and 17
    flags = np.array([0, 1, 0, 4, 4, 5, 0, 0], np.uint16)
    ts = T0 + np.arange(8) * 0.1
    ts_corr = ts - np.array([0.0, 0, 0, 0, 0, 0, 0, 2.0])
    b = block(x, seq=seq, sensor_flags=flags, ts=ts)
    tight = ReferenceBins.from_manifest(small_manifest(), vary=np.array([True, True, True]), stuck_run=3)
    profile = HardwareProfile(name="t", ranges={"humidity_pct": {"min": 0.0, "max": 100.0}})
    ranges = RangeLimits.from_profile(profile, NAMES)
    s = sketch_block(tight, b, received_at=T0 + 3.0, ts_corrected=ts_corr, ranges=ranges)
    assert s.feature_out_of_range.tolist() == [0, 2, 0]  # 101 and -1; 0 and 100 are inside; NaN is not
    assert s.feature_nan.tolist() == [0, 0, 2]
    assert s.feature_repeat.tolist() == [5, 2, 1]  # NaN never repeats
    # A run of 6 equal temperatures with stuck_run 3 adds 6 - 3 + 1 = 4; humidity's runs are 2 long.
    assert s.feature_stuck.tolist() == [4, 0, 0]
    # The default bins: only audio_flatness should vary (the others have merged bins), and no run is 200 long.
    assert sketch_block(bins, b, received_at=T0).feature_stuck.tolist() == [0, 0, 0]
    assert (s.seq_missing, s.seq_gaps) == (3, 2)
    # Seq 13, 14 and 17 travelled in another block of the batch (a shadow model): nothing is missing.
    others = np.concatenate([seq, [13, 14, 17]])
    assert sketch_block(tight, b, received_at=T0, all_seqs=others).seq_missing == 0
    assert s.flag_bits[:4].tolist() == [2, 0, 3, 0] and s.flag_bits[4:].sum() == 0
    assert s.flagged_records == 4
    delay = T0 + 3.0 - ts_corr
    assert math.isclose(s.delay_sum, delay.sum()) and math.isclose(s.delay_sumsq, (delay**2).sum())
    assert (s.delay_min, s.delay_max) == (delay.min(), delay.max())
    assert (s.offset_min, s.offset_max, s.offset_sum) == (0.0, 2.0, 2.0)
    assert (s.ts_min, s.ts_max) == (ts_corr.min(), ts_corr.max())


def test_successive_differences_of_consecutive_records(bins: ReferenceBins) -> None:
    x = np.array([[1.0, 0.0, 0.5], [3.0, np.nan, 0.5], [2.0, 4.0, 0.25], [2.0, 1.0, 1.0]], np.float32)
    pred = np.array([0, 0, 2, 2], np.int16)
    conf = np.array([0.5, 0.75, np.nan, 0.25], np.float16)
    coact = np.array([0, 2, 1, 1], np.uint16)
    s = sketch_block(bins, block(x, pred=pred, calibrated=conf, coact=coact), received_at=T0)
    assert LAGS == (1, 8)  # the first axis of every successive-difference field
    # Lag 1. Feature 0: (3-1)² + (2-3)² + 0; feature 1: only the pair (4, 1) is finite; feature 2: 0 + 1/16 + 9/16.
    assert s.feature_diff_sq[0].tolist() == [5.0, 9.0, 0.625]
    assert s.feature_pairs[0].tolist() == [3, 1, 3]
    assert (s.class_pairs[0], s.class_same[0]) == (3, 2)  # 0->0 and 2->2 repeat, 0->2 does not
    assert (s.conf_pairs[0], s.conf_diff_sq[0]) == (1, 0.0625)  # NaN breaks two of the three pairs
    assert (s.score_pairs[0], s.coact_diff_sq[0], s.coact_sumsq) == (3, 5.0, 6.0)
    # Four records have no pair eight apart.
    assert s.feature_pairs[1].tolist() == [0, 0, 0] and s.score_pairs[1] == 0 and s.feature_diff_sq[1].sum() == 0
    # PCA error as the sketch computes it (the missing input imputed with its reference mean).
    filled = np.where(np.isfinite(x), x, bins.impute_mean)
    err = reconstruction_error((filled - bins.norm_mean) / bins.norm_std, bins.components)
    assert math.isclose(s.pca_sumsq, float(err @ err))
    assert math.isclose(s.pca_diff_sq[0], float(np.diff(err) @ np.diff(err))) and s.pca_diff_sq[0] > 0
    # Lag 8 on a longer block: x_t - x_{t-8} of a ramp is 8 everywhere.
    ramp = np.repeat(np.arange(20, dtype=np.float32)[:, None], 3, axis=1)
    r = sketch_block(bins, block(ramp), received_at=T0)
    assert r.feature_pairs.tolist() == [[19] * 3, [12] * 3] and r.feature_diff_sq[1].tolist() == [12 * 64.0] * 3
    # One record is no pair at all.
    one = sketch_block(bins, block(x[:1]), received_at=T0)
    assert one.score_pairs.tolist() == [0, 0] and one.class_pairs.tolist() == [0, 0]
    assert one.feature_pairs.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_bad_records_give_specific_errors(bins: ReferenceBins) -> None:
    with pytest.raises(SketchError) as err:
        sketch_block(bins, block(np.zeros((4, 5), np.float32)), received_at=T0)
    assert err.value.reason == "feature_count"
    with pytest.raises(ValueError, match="received_at"):
        sketch_block(bins, block(np.zeros((4, 3), np.float32)))
    with pytest.raises(SketchError) as err:
        sketch_block(bins, block(np.zeros((4, 3), np.float32)), received_at=T0, ts_corrected=np.full(4, np.nan))
    assert err.value.reason == "bad_timestamp"


def test_infinite_inputs_count_as_missing_and_an_empty_block_is_the_empty_sketch(bins: ReferenceBins) -> None:
    x = np.array([[np.inf, 1.0, 0.5], [1.0, -np.inf, 0.5]], np.float32)
    s = sketch_block(bins, block(x), received_at=T0)
    assert s.feature_nan.tolist() == [1, 1, 0] and s.feature_hist.sum(axis=1).tolist() == [1, 1, 2]
    assert s.feature_sum.tolist() == [1.0, 1.0, 1.0] and s.records_missing == 2
    empty = sketch_block(bins, block(np.zeros((0, 3), np.float32)), received_at=T0)
    assert empty.same_as(WindowSketch.empty(bins))
    assert split_by_window(bins, block(np.zeros((0, 3), np.float32)), 10.0, received_at=T0) == {}


# ----------------------------------------------------------------------------------- merging


def random_block(n: int, seed: int, first_seq: int = 10, t: float = T0) -> RecordBlock:
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, 3)).astype(np.float32)
    x[rng.random((n, 3)) < 0.05] = np.nan
    return block(
        x,
        seq=np.arange(first_seq, first_seq + n, dtype=np.uint64),
        ts=t + np.arange(n) * 0.1,
        pred=rng.integers(0, 3, n).astype(np.int16),
        label=np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), -1).astype(np.int16),
        calibrated=rng.uniform(0.3, 1.0, n).astype(np.float32),
        coact=rng.poisson(0.5, n).astype(np.uint16),
        sensor_flags=rng.choice(np.array([0, 0, 0, 1, 2, 8], np.uint16), n),
    )


def test_merge_is_associative_commutative_and_has_an_identity(bins: ReferenceBins) -> None:
    a, b, c = (sketch_block(bins, random_block(30, s), received_at=T0 + 9) for s in (1, 2, 3))
    assert ((a + b) + c).same_as(a + (b + c))
    assert (a + b).same_as(b + a)
    assert (WindowSketch.empty(bins) + a).same_as(a)
    assert merge_all([a, b, c]).same_as(merge(merge(a, b), c))
    assert merge_all([], bins).same_as(WindowSketch.empty(bins))
    assert sum([a, b, c]).same_as(a + b + c)  # type: ignore[union-attr]
    assert (a + b).n == 60 and not (a + b).same_as(a)


def _records(b: RecordBlock, sl: slice) -> RecordBlock:
    """Records ``sl`` of ``b`` (its per-record columns sliced; no sampled activations in these blocks)."""
    return dataclasses.replace(
        b,
        **{
            f.name: getattr(b, f.name)[sl]
            for f in dataclasses.fields(b)
            if isinstance(getattr(b, f.name), np.ndarray) and not f.name.startswith("act_sample")
        },
    )


PAIR_FIELDS = (
    "feature_diff_sq",
    "feature_pairs",
    "class_pairs",
    "class_same",
    "conf_pairs",
    "conf_diff_sq",
    "score_pairs",
    "pca_diff_sq",
    "coact_diff_sq",
)


def test_sketch_of_a_union_is_the_sum_of_the_sketches(bins: ReferenceBins) -> None:
    whole = random_block(60, 5)
    one = sketch_block(bins, whole, received_at=T0 + 9)
    merged = sum(sketch_block(bins, _records(whole, sl), received_at=T0 + 9) for sl in (slice(0, 25), slice(25, 60)))
    assert isinstance(merged, WindowSketch)
    # Successive differences see a record's predecessor within its block only: at lag 1 the one pair that
    # crosses the cut (records 24 and 25) is all that differs, and it is exactly the sketch of those two.
    across = sketch_block(bins, _records(whole, slice(24, 26)), received_at=T0 + 9)
    assert across.score_pairs.tolist() == [1, 0] and one.score_pairs.tolist() == [59, 52]
    # At lag 8 the eight pairs that cross the cut (17->25 ... 24->32) are missing: 17 + 27 of the whole's 52.
    assert merged.score_pairs.tolist() == [58, 44]
    for f in PAIR_FIELDS:  # lag 8 taken from the whole block; lag 1 completed with the crossing pair
        getattr(merged, f)[1] = getattr(one, f)[1]
    completed = dataclasses.replace(merged, **{f: getattr(merged, f) + getattr(across, f) for f in PAIR_FIELDS})
    assert one.same_as(completed)
    assert one.n == 60 and one.labelled > 0 and one.flag_bits.sum() > 0 and one.feature_nan.sum() > 0


def test_inference_rows_and_record_block_give_the_same_sketch(bins: ReferenceBins) -> None:
    b = random_block(40, 8)
    batch = decode_batch(encode_batch(make_batch(b, blocks=[b], seq_first=10, seq_last=49)))
    rows = InferenceRows.from_block(batch, batch.blocks[0], T0 + 20)
    from_rows = sketch_block(bins, rows)
    from_block = sketch_block(bins, batch.blocks[0], received_at=T0 + 20, ts_corrected=rows.ts_corrected)
    assert from_rows.same_as(from_block)
    assert from_rows.n == 40


# ----------------------------------------------------------------------------------- windows


def test_window_start_buckets_on_multiples_of_the_window() -> None:
    ts = np.array([T0, T0 + 9.999, T0 + 10, T0 - 0.001])
    assert window_start(ts, 10.0).tolist() == [T0, T0, T0 + 10, T0 - 10]
    assert float(window_start(T0 + 1000.0)) == T0 + 900  # default 15 minutes
    with pytest.raises(ValueError):
        window_start(ts, 0.0)


def test_split_by_window_gives_one_sketch_per_window(bins: ReferenceBins) -> None:
    b = random_block(250, 9, t=T0 + 2.0)  # 25 s of records from T0 + 2 s: windows T0, T0+10, T0+20
    out = split_by_window(bins, b, 10.0, received_at=T0 + 30)
    assert sorted(out) == [T0, T0 + 10, T0 + 20]
    assert [out[k].n for k in sorted(out)] == [80, 100, 70]
    assert merge_all(out.values()).same_as(sketch_block(bins, b, received_at=T0 + 30))
    assert out[T0 + 10].ts_min >= T0 + 10 and out[T0 + 10].ts_max < T0 + 20
    # Out of time order (a clock step back): windows are still exact.
    shuffled = dataclasses.replace(b, ts=np.roll(b.ts, 100))
    out2 = split_by_window(bins, shuffled, 10.0, received_at=T0 + 30)
    assert sorted(out2) == [T0, T0 + 10, T0 + 20]
    assert sum(s.n for s in out2.values()) == 250
    assert merge_all(out2.values()).same_as(sketch_block(bins, shuffled, received_at=T0 + 30))
    assert split_by_window(bins, random_block(5, 1), 10.0, received_at=T0).keys() == {T0}


def test_daily_rollup(bins: ReferenceBins) -> None:
    day = 86_400.0
    d0 = math.floor(T0 / day) * day
    windows = {
        d0 + 10.0: sketch_block(bins, random_block(10, 1), received_at=T0),
        d0 + 900.0: sketch_block(bins, random_block(20, 2), received_at=T0),
        d0 + day + 5.0: sketch_block(bins, random_block(30, 3), received_at=T0),
    }
    days = rollup(windows)
    assert sorted(days) == [d0, d0 + day]
    assert days[d0].same_as(windows[d0 + 10.0] + windows[d0 + 900.0])
    assert days[d0 + day].n == 30


# ----------------------------------------------------------------------------- serialisation


def test_bytes_round_trip_and_bad_bytes(bins: ReferenceBins) -> None:
    s = sketch_block(bins, random_block(50, 3), received_at=T0 + 9)
    data = s.to_bytes()
    back = WindowSketch.from_bytes(data)
    assert back.same_as(s, rtol=0.0, atol=0.0)
    assert WindowSketch.from_bytes(WindowSketch.empty(bins).to_bytes()).same_as(WindowSketch.empty(bins))
    for bad in (b"", b"not a sketch", data[:-5]):
        with pytest.raises(SketchError):
            WindowSketch.from_bytes(bad)
    wrong = dataclasses.replace(s, feature_nan=np.zeros(7, np.int64))
    with pytest.raises(SketchError, match="feature_nan"):
        WindowSketch.from_bytes(wrong.to_bytes())
    other = ReferenceBins.from_manifest(small_manifest().model_copy(update={"labels": ["a", "b", "c", "d"]}))
    with pytest.raises(SketchError) as err:
        merge(s, WindowSketch.empty(other))
    assert err.value.reason == "shape_mismatch"


def test_format_1_sketches_read_with_no_pairs(bins: ReferenceBins) -> None:
    import msgpack
    import zstandard

    s = sketch_block(bins, random_block(50, 3), received_at=T0 + 9)
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(s.to_bytes()), raw=False)
    assert doc["v"] == 2
    for name in (*PAIR_FIELDS, "pca_sumsq", "coact_sumsq"):
        del doc["f"][name]
    old = zstandard.ZstdCompressor().compress(msgpack.packb({"v": 1, "f": doc["f"]}, use_bin_type=True))
    back = WindowSketch.from_bytes(old)
    assert back.n == s.n and np.array_equal(back.feature_hist, s.feature_hist)
    assert back.score_pairs.tolist() == [0, 0] and back.feature_pairs.tolist() == [[0, 0, 0]] * 2
    assert back.pca_sumsq == 0.0
    doc["f"]["pca_sumsq"] = 3.0  # a format-1 document cannot carry format-2 fields
    bad = zstandard.ZstdCompressor().compress(msgpack.packb({"v": 1, "f": doc["f"]}, use_bin_type=True))
    with pytest.raises(SketchError, match="format-2 fields"):
        WindowSketch.from_bytes(bad)


# ---------------------------------------------------------------------------- real bundle


@pytest.fixture(scope="module")
def cabin() -> Manifest:
    if not CABIN_BUNDLE.exists():
        pytest.skip("edge_agent/bundles/cabin-v1.tar is not committed")
    return load_bundle(CABIN_BUNDLE, load_public_keys([DEV_PUB]), check_tensors=False).manifest


def cabin_rows(m: Manifest, n: int, *, precision: str) -> InferenceRows:
    rng = np.random.default_rng(11)
    mean, std = np.array(m.normalisation.mean), np.array(m.normalisation.std)
    b = make_block(n, features=len(m.features), classes=len(m.labels))
    x = (mean + std * rng.normal(size=(n, len(m.features)))).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    b = dataclasses.replace(b, features=x)
    batch = decode_batch(
        encode_batch(make_batch(b, seq_first=int(b.seq[0]), seq_last=int(b.seq[-1])), feature_precision=precision)
    )
    return InferenceRows.from_block(batch, batch.blocks[0], float(b.ts[-1]) + 5.0)


def test_real_bundle_bins_match_the_reference_binning_and_cost(cabin: Manifest) -> None:
    bins = ReferenceBins.from_manifest(cabin)
    assert bins.n_features == 40 and bins.components.shape[1] == 40
    rows16 = cabin_rows(cabin, 500, precision="auto")
    assert rows16.features_dtype == "<f2"
    x = rows16.features.view("<f2").reshape(500, 40)
    s16 = sketch_block(bins, rows16)
    rows32 = dataclasses.replace(
        rows16, features_dtype="<f4", features=np.ascontiguousarray(x.astype("<f4")).view(np.uint8)
    )
    s32 = sketch_block(bins, rows32)
    # The float16 lookup table and the float32 comparisons agree, and both agree with bin_counts.
    assert s16.same_as(s32)
    for f, ref in enumerate(cabin.reference.features):
        nb = len(ref.histogram.counts)
        assert s16.feature_hist[f, :nb].tolist() == bin_counts(x[:, f], ref.histogram.edges).tolist()
        assert s16.feature_hist[f, nb:].sum() == 0
    assert s16.feature_nan.sum() == int(np.isnan(x).sum()) > 0
    assert s16.n == 500 and s16.class_counts.sum() == 500
    # Exempt from stuck-value counting: the particle features with merged quantile bins, and pressure,
    # whose std float16 cannot resolve.
    exempt = [n for n, v in zip(cabin.features, bins.vary, strict=True) if not v]
    assert exempt == [
        "pressure_hpa",
        "pm1_ug_m3",
        "pm25_ug_m3",
        "pm10_ug_m3",
        "particles_gt_0_3um_log10",
        "particles_gt_2_5um_log10",
        "particles_gt_5_0um_log10",
        "particles_gt_10_0um_log10",
    ]
    # A microphone frozen for 300 of the 500 records: 300 - 200 + 1 records end a run of >= 200 equal values;
    # pressure frozen just as long is not counted.
    frozen = x.copy()
    rms, pressure = cabin.features.index("audio_rms_dbfs"), cabin.features.index("pressure_hpa")
    frozen[100:400, rms] = -120.0
    frozen[100:400, pressure] = 1013.0
    s = sketch_block(bins, dataclasses.replace(rows16, features=np.ascontiguousarray(frozen).view(np.uint8)))
    assert s.feature_stuck[rms] == 101 and s.feature_stuck.sum() == 101
    assert s.feature_repeat[rms] == 299 and s.feature_repeat[pressure] >= 299  # float16 pressure repeats anyway

    for name, rows in (("float16", rows16), ("float32", rows32)):
        sketch_block(bins, rows)
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            sketch_block(bins, rows)
        per_block = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps):
            split_by_window(bins, rows, 10.0)
        per_split = (time.perf_counter() - start) / reps
        print(
            f"\nsketch_block cabin-v1 {name}: {per_block * 1e3:.3f} ms per 500-record block, "
            f"{per_block / 500 * 1e6:.2f} µs/record; split_by_window(10 s) {per_split / 500 * 1e6:.2f} µs/record; "
            f"stored sketch {len(s16.to_bytes())} bytes"
        )

"""Test copies of the committed cabin bundle."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from shared.bundle import load_bundle, manifest_json, write_bundle
from shared.signing import load_private_key, load_public_keys, sign

REPO = Path(__file__).resolve().parents[2]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
DEV_KEY = REPO / "collector" / "training" / "dev-release-key.pem"


@functools.cache
def independent_cabin_bundle() -> Path:
    """``cabin-v1`` without its decorrelation times (so without the time cap), signed with the development key.

    The monitoring service tests send rows drawn at random from simulated drives, i.e. independent
    records, stamped 0.1 s apart in 10-s windows to keep the tests short. By the committed bundle's
    decorrelation times (17 to 238 s), 10 s of one vehicle are worth about one independent record, and
    every test would rightly say "not enough data". These tests are about scopes, merging, verdicts,
    alerts and the API; the time cap has its own tests (``test_dependence.py``, the alarm-storm test),
    which use the committed bundle.
    """
    bundle = load_bundle(CABIN_BUNDLE, load_public_keys([DEV_PUB]), check_tensors=False)
    doc = bundle.manifest.model_dump(mode="json")
    doc["reference"]["decorrelation"] = None
    manifest = manifest_json(doc)
    folder = Path(tempfile.mkdtemp(prefix="cabin-independent-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "cabin-v1.tar"
    write_bundle(path, bundle.model, manifest, sign(manifest, load_private_key(DEV_KEY)))
    return path

"""The model registry on SQLite and PostgreSQL over the real API: pushes validated (real TFLite, real Ed25519),
re-signed, stored by content, downloaded whole and by ranges; refusals with their reasons and counters; lineage,
stages, cards; ``fleetctl models`` against a served collector."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from collector.app import create_app
from collector.config import ConfigError, Settings
from collector.fleetctl import main as fleetctl
from collector.registry.keys import DEV_KEY, ReleaseKeys
from shared.bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, load_bundle, manifest_json, write_bundle
from shared.signing import PublicKey, generate_private_key, load_private_key, load_public_keys, sign
from tests.services import serve_app

REPO = Path(__file__).resolve().parents[2]
CABIN = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
NAME = "cabin-events"


def members(path: Path) -> dict[str, bytes]:
    """The three files of a bundle tar."""
    with tarfile.open(path) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def variant(
    folder: Path,
    version: str,
    *,
    parent: str | None = None,
    metrics: dict[str, float] | None = None,
    key: Path = DEV_KEY,
    description: str | None = None,
) -> Path:
    """The cabin bundle as another version (same model), its manifest re-signed with ``key``."""
    files = members(CABIN)
    doc = json.loads(files[MANIFEST_FILE])
    doc["version"] = version
    doc["parent_version"] = parent
    if metrics is not None:
        doc["training"]["metrics"] = metrics
    if description is not None:
        doc["description"] = description
    manifest = manifest_json(doc)
    path = folder / f"{NAME}-{version}.tar"
    write_bundle(path, files[MODEL_FILE], manifest, sign(manifest, load_private_key(key)))
    return path


def raw_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A tar holding exactly ``files`` (for malformed bundles)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def push(client: TestClient, path: Path, **params: Any) -> httpx.Response:
    return client.post(
        "/api/v1/models", content=path.read_bytes(), params=params, headers={"Content-Type": "application/x-tar"}
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, PublicKey]:
    """A fresh release key (not the development key that signed the pushed bundles)."""
    key = tmp_path / "release.pem"
    return key, generate_private_key(key)


def registry_settings(url: str, folder: Path, release_key: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "data_dir": folder,
        "mqtt_url": "mqtt://127.0.0.1:1",
        "release_key": release_key,
        "registry_upload_keys": [DEV_PUB],
        "public_url": "http://fleet.example:8000",
    }
    values.update(over)
    return Settings(**values)


@pytest.fixture
def api(db_url: str, tmp_path: Path, release: tuple[Path, PublicKey]) -> Iterator[TestClient]:
    settings = registry_settings(db_url, tmp_path, release[0])
    with TestClient(create_app(settings, start_ingest=False)) as client:
        yield client


# ------------------------------------------------------------------------------- push, store, download


def test_push_validates_resigns_stores_and_downloads_with_ranges(
    api: TestClient, tmp_path: Path, release: tuple[Path, PublicKey]
) -> None:
    _key, release_pub = release
    stored_before = counter("fleet_registry_pushes_total", outcome="stored")
    r = push(api, CABIN, by="alice")
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["name"], v["version"], v["stage"], v["created"]) == (NAME, "1.0.0", "candidate", True)
    assert v["lineage"]["pushed_by"] == "alice"
    assert v["lineage"]["uploader_key_id"] == load_public_keys([DEV_PUB])[0].key_id
    assert v["lineage"]["release_key_id"] == release_pub.key_id
    assert counter("fleet_registry_pushes_total", outcome="stored") == stored_before + 1

    # Stored by content: the file named by its sha256, re-signed by the release key, manifest and model unchanged.
    stored = tmp_path / "artefacts" / "sha256" / v["sha256"][:2] / f"{v['sha256']}.tar"
    data = stored.read_bytes()
    assert hashlib.sha256(data).hexdigest() == v["sha256"] and len(data) == v["size"]
    original, resigned = members(CABIN), members(stored)
    assert resigned[MODEL_FILE] == original[MODEL_FILE] and resigned[MANIFEST_FILE] == original[MANIFEST_FILE]
    assert resigned[SIGNATURE_FILE] != original[SIGNATURE_FILE]
    assert load_bundle(stored, [release_pub]).key_id == release_pub.key_id

    # The same bundle again is idempotent; the same version with other content is a conflict.
    again = push(api, CABIN)
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["sha256"] == v["sha256"]
    other = variant(tmp_path, "1.0.0", description="something else")
    r = push(api, other)
    assert r.status_code == 409
    assert r.json()["detail"]["reason"] == "version_conflict" and "already stored" in r.json()["detail"]["message"]

    # Download: whole, ranged, resumed from the middle, a range past the end, If-Range with a stale tag, HEAD.
    url = v["download"]
    assert url == f"/api/v1/models/{NAME}/1.0.0/bundle"
    full = api.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{v["sha256"]}"' and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "application/x-tar"
    part = api.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == data[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(data)}"
    middle = len(data) // 2
    rest = api.get(url, headers={"Range": f"bytes={middle}-", "If-Range": f'"{v["sha256"]}"'})
    assert rest.status_code == 206 and data[:middle] + rest.content == data
    bad = api.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"
    stale = api.get(url, headers={"Range": f"bytes={middle}-", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == data
    head = api.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""
    assert api.get(f"/api/v1/models/{NAME}/9.9.9/bundle").status_code == 404

    keys = api.get("/api/v1/models/keys").json()
    assert keys["release_key_id"] == release_pub.key_id
    assert [k["public_key"] for k in keys["published"]] == [release_pub.to_text()]


def test_bad_pushes_are_refused_with_reasons_and_counted(
    db_url: str, tmp_path: Path, release: tuple[Path, PublicKey]
) -> None:
    cabin = members(CABIN)
    stranger = tmp_path / "stranger.pem"
    generate_private_key(stranger)
    manifest = json.loads(cabin[MANIFEST_FILE])
    manifest["description"] = "tampered after signing"
    truncated_model = cabin[MODEL_FILE][:-100]
    cases = {
        "hash_mismatch": raw_tar(tmp_path / "t1.tar", {**cabin, MODEL_FILE: truncated_model}),
        "bad_signature": raw_tar(tmp_path / "t2.tar", {**cabin, MANIFEST_FILE: manifest_json(manifest)}),
        "unsigned": raw_tar(tmp_path / "t3.tar", {MODEL_FILE: cabin[MODEL_FILE], MANIFEST_FILE: cabin[MANIFEST_FILE]}),
        "unknown_key": variant(tmp_path, "1.0.1", key=stranger),
        "bad_archive": tmp_path / "garbage.tar",
        "unexpected_member": raw_tar(tmp_path / "t4.tar", {**cabin, "evil.sh": b"rm -rf /"}),
        "bad_manifest": raw_tar(tmp_path / "t5.tar", {**cabin, MANIFEST_FILE: b'{"name": "x"}'}),
    }
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01 not a tar at all " * 200)
    with TestClient(create_app(registry_settings(db_url, tmp_path, release[0]), start_ingest=False)) as api:
        for reason, path in cases.items():
            before = counter("fleet_registry_push_rejections_total", reason=reason)
            r = push(api, path)
            assert r.status_code == 422, (reason, r.text)
            assert r.json()["detail"]["reason"] == reason, r.text
            assert counter("fleet_registry_push_rejections_total", reason=reason) == before + 1
        r = api.post("/api/v1/models", content=b"")
        assert r.status_code == 422 and r.json()["detail"]["reason"] == "empty"
    settings = registry_settings(db_url, tmp_path, release[0], registry_max_upload_bytes=60_000)
    with TestClient(create_app(settings, start_ingest=False)) as api:
        before = counter("fleet_registry_push_rejections_total", reason="too_large")
        r = push(api, CABIN)  # 71,680 bytes > 60,000
        assert r.status_code == 413 and r.json()["detail"]["reason"] == "too_large"
        r = api.post("/api/v1/models", content=iter([b"x" * 40_000, b"y" * 40_000]))  # no Content-Length: streamed
        assert r.status_code == 413 and r.json()["detail"]["reason"] == "too_large"
        assert counter("fleet_registry_push_rejections_total", reason="too_large") == before + 2
        assert api.get("/api/v1/models").json()["total"] == 0
        assert list((tmp_path / "artefacts" / "tmp").iterdir()) == []  # nothing half-written left behind
    # Still healthy: a good bundle goes in afterwards.
    with TestClient(create_app(registry_settings(db_url, tmp_path, release[0]), start_ingest=False)) as api:
        assert push(api, CABIN).status_code == 201


def test_no_release_key_refuses_pushes(sqlite_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, registry_upload_keys=[DEV_PUB])
    with TestClient(create_app(settings, start_ingest=False)) as api:
        r = push(api, CABIN)
        assert r.status_code == 503 and r.json()["detail"]["reason"] == "no_release_key"
    with pytest.raises(ConfigError, match="No such file"):
        ReleaseKeys.from_settings(Settings(release_key=tmp_path / "missing.pem"))
    (tmp_path / "junk.pub").write_text("ed25519:not-base64!\n")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        ReleaseKeys.from_settings(Settings(registry_upload_keys=[tmp_path / "junk.pub"]))
    dev = Settings(database_url=sqlite_url, data_dir=tmp_path, registry_dev_key=True)
    with TestClient(create_app(dev, start_ingest=False)) as api:
        v = push(api, CABIN).json()
        assert v["lineage"]["release_key_id"] == v["lineage"]["uploader_key_id"]  # the development key signs


# -------------------------------------------------------------------------- lineage, stages, cards


def test_lineage_stages_and_cards(api: TestClient, tmp_path: Path) -> None:
    assert push(api, CABIN, by="trainer").status_code == 201
    v11 = variant(tmp_path, "1.1.0", parent="1.0.0", metrics={"test_accuracy": 0.97, "test_macro_f1": 0.96})
    assert push(api, v11, by="bob").status_code == 201
    shown = api.get(f"/api/v1/models/{NAME}/1.1.0").json()
    lin = shown["lineage"]
    assert (lin["parent_version"], lin["dataset_version"], lin["pushed_by"]) == ("1.0.0", "cabin_v1", "bob")
    assert lin["metrics"] == {"test_accuracy": 0.97, "test_macro_f1": 0.96}
    assert lin["code_version"].startswith("fleet-model-health")
    assert [h["to_stage"] for h in shown["history"]] == ["candidate"]

    def stage(version: str, to: str) -> httpx.Response:
        return api.post(f"/api/v1/models/{NAME}/{version}/stage", json={"stage": to, "by": "ops", "note": "qa"})

    assert stage("1.0.0", "production").json()["stage"] == "production"
    r = stage("1.1.0", "production")  # supersedes 1.0.0, which goes back to candidate
    assert r.status_code == 200 and r.json()["stage"] == "production"
    assert api.get(f"/api/v1/models/{NAME}/1.0.0").json()["stage"] == "candidate"
    assert [x["version"] for x in api.get("/api/v1/models", params={"stage": "production"}).json()["items"]] == [
        "1.1.0"
    ]
    assert stage("1.1.0", "production").status_code == 200  # the same stage again: no change
    assert stage("1.0.0", "archived").json()["stage"] == "archived"
    r = stage("1.0.0", "production")
    assert r.status_code == 409 and r.json()["detail"]["reason"] == "bad_transition"
    assert stage("1.0.0", "candidate").json()["stage"] == "candidate"
    assert stage("1.0.0", "retired").status_code == 422
    assert stage("7.0.0", "candidate").status_code == 404

    # A pinned version cannot be archived; an archived one cannot be pinned.
    api.post("/api/v1/groups", json={"name": "depot-a"})
    assert api.put("/api/v1/groups/depot-a/pin", json={"model_name": NAME, "model_version": "1.0.0"}).status_code == 200
    r = stage("1.0.0", "archived")
    assert (
        r.status_code == 409
        and r.json()["detail"]["reason"] == "in_use"
        and "group depot-a" in r.json()["detail"]["message"]
    )
    assert api.get(f"/api/v1/models/{NAME}/1.0.0").json()["pins"][0]["subject"] == "depot-a"
    assert api.delete("/api/v1/groups/depot-a/pin").status_code == 204
    assert stage("1.0.0", "archived").status_code == 200
    r = api.put("/api/v1/groups/depot-a/pin", json={"model_name": NAME, "model_version": "1.0.0"})
    assert r.status_code == 409 and r.json()["detail"]["reason"] == "not_deployable"

    history = api.get(f"/api/v1/models/{NAME}/1.0.0").json()["history"]
    assert [(h["from_stage"], h["to_stage"]) for h in history] == [
        (None, "candidate"),
        ("candidate", "production"),
        ("production", "candidate"),
        ("candidate", "archived"),
        ("archived", "candidate"),
        ("candidate", "archived"),
    ]
    assert history[2]["note"] == "superseded by 1.1.0"

    md = api.get(shown["card_markdown"])
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    text = md.text
    assert text.startswith(f"# Model card: {NAME} 1.1.0")
    for expected in ("## Lineage", "| test_accuracy | 0.97 |", "parent version**: 1.0.0", "window_open", "temperature"):
        assert expected in text, expected
    assert "minimum agent version**: 0.1.0" in text and shown["sha256"] in text
    page = api.get(shown["card_html"])
    assert page.headers["content-type"].startswith("text/html")
    assert "<h2>Metrics</h2>" in page.text and "<td>test_accuracy</td><td>0.97</td>" in page.text

    page1 = api.get("/api/v1/models", params={"limit": 1}).json()
    assert page1["total"] == 2 and len(page1["items"]) == 1 and page1["next"]
    page2 = api.get("/api/v1/models", params={"limit": 1, "cursor": page1["next"]}).json()
    assert [x["version"] for x in page1["items"] + page2["items"]] == ["1.0.0", "1.1.0"] and page2["next"] is None
    assert api.get("/api/v1/models", params={"cursor": "junk"}).status_code == 422


# ---------------------------------------------------------------------------------------- fleetctl


def test_fleetctl_models(
    sqlite_url: str,
    tmp_path: Path,
    release: tuple[Path, PublicKey],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(registry_settings(sqlite_url, tmp_path, release[0]), start_ingest=False)
    with serve_app(app) as base:

        def run(*args: str) -> tuple[int, str, str]:
            """Exit code, stdout, and stderr with the error logged (pytest captures the log, not stderr)."""
            caplog.clear()
            code = fleetctl(["--api-url", base, "models", *args])
            captured = capsys.readouterr()
            errors = "".join(r.getMessage() for r in caplog.records if r.name == "fleetctl")
            return code, captured.out, captured.err + errors

        code, out, err = run("push", str(CABIN), "--by", "carol")
        assert code == 0, err
        assert out.startswith(f"stored: {NAME} 1.0.0 [candidate]") and "pushed" in out and "carol" in out
        assert "100%" in err and "push cabin-v1.tar [" in err  # the progress bar
        code, out, _ = run("push", str(CABIN), "--json", "--no-progress")
        assert code == 0 and json.loads(out)["created"] is False
        code, _, err = run("push", str(variant(tmp_path, "1.0.0", description="other")), "--no-progress")
        assert code == 1 and "409" in err and "version_conflict" in err

        code, out, _ = run("list")
        lines = out.strip().splitlines()
        assert lines[0].split()[:3] == ["NAME", "VERSION", "STAGE"] and lines[2].split()[:3] == [
            NAME,
            "1.0.0",
            "candidate",
        ]
        code, out, _ = run("list", "--json")
        assert json.loads(out) == httpx.get(f"{base}/api/v1/models", params={"limit": 500}).json()
        code, out, _ = run("show", NAME, "1.0.0")
        assert code == 0 and "dataset       cabin_v1" in out and "card.md" in out and "test_accuracy" in out

        assert run("stage", NAME, "1.0.0", "production", "--by", "ops")[1].strip() == f"{NAME} 1.0.0 is production"
        code, _, err = run("stage", NAME, "1.0.0", "archived")
        assert code == 0
        code, _, err = run("stage", NAME, "1.0.0", "production")
        assert code == 1 and "bad_transition" in err
        run("stage", NAME, "1.0.0", "candidate")
        code, out, _ = run("pin", NAME, "1.0.0", "--device", "veh-007", "--json")
        assert code == 0 and json.loads(out)["subject"] == "veh-007"
        assert run("unpin", "--device", "veh-007")[1].strip() == "device veh-007 unpinned"
        assert run("unpin", "--device", "veh-007")[0] == 1  # no pin any more: 404

        # Download, then resume a half-finished one: only the rest is fetched and the result checks out.
        stored = api_bytes = httpx.get(f"{base}/api/v1/models/{NAME}/1.0.0/bundle").content
        out_path = tmp_path / "dl" / "b.tar"
        out_path.parent.mkdir()
        code, out, err = run("download", NAME, "1.0.0", "--out", str(out_path))
        assert code == 0 and out_path.read_bytes() == stored and "verified" in out and "100%" in err
        out_path.unlink()
        half = len(api_bytes) // 2
        (out_path.parent / "b.tar.part").write_bytes(api_bytes[:half])
        code, out, _ = run("download", NAME, "1.0.0", "--out", str(out_path), "--json", "--no-progress")
        result = json.loads(out)
        assert code == 0 and result["resumed_from"] == half and result["fetched"] == len(api_bytes) - half
        assert out_path.read_bytes() == stored and not (out_path.parent / "b.tar.part").exists()
        # A corrupt partial file is detected by the hash, removed, and the next run starts over.
        out_path.unlink()
        (out_path.parent / "b.tar.part").write_bytes(b"\xff" * half)
        code, _, err = run("download", NAME, "1.0.0", "--out", str(out_path), "--no-progress")
        assert code == 1 and "sha256" in err and not (out_path.parent / "b.tar.part").exists()
        assert run("download", NAME, "1.0.0", "--out", str(out_path), "--no-progress")[0] == 0
        assert out_path.read_bytes() == stored

        code, out, _ = run("card", NAME, "1.0.0")
        assert code == 0 and out.startswith(f"# Model card: {NAME} 1.0.0")
        code, out, _ = run("card", NAME, "1.0.0", "--html", "--out", str(tmp_path / "card.html"))
        assert code == 0 and (tmp_path / "card.html").read_text().startswith("<!DOCTYPE html>")
        code, out, _ = run("keys")
        assert code == 0 and release[1].key_id in out

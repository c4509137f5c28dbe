"""Release-key signing with rotation, and hardware profile validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.profile import HardwareProfile, ProfileError, find_profile, load_profile
from shared.signing import SignatureError, generate_private_key, load_private_key, load_public_keys, sign, verify


def test_sign_verify_and_rotation(tmp_path: Path) -> None:
    old_pub = generate_private_key(tmp_path / "old.key")
    new_pub = generate_private_key(tmp_path / "new.key")
    pinned = tmp_path / "trusted.pub"
    pinned.write_text(f"# devices trust both keys during a rotation\n{old_pub.to_text()}\n{new_pub.to_text()}\n")
    trusted = load_public_keys([pinned])
    assert {k.key_id for k in trusted} == {old_pub.key_id, new_pub.key_id}
    data = b'{"name": "m"}'
    assert verify(data, sign(data, load_private_key(tmp_path / "new.key")), trusted) == new_pub.key_id
    assert verify(data, sign(data, load_private_key(tmp_path / "old.key")), trusted) == old_pub.key_id


def test_signature_failures(tmp_path: Path) -> None:
    pub = generate_private_key(tmp_path / "k.key")
    generate_private_key(tmp_path / "stranger.key")
    key = load_private_key(tmp_path / "k.key")
    data = b"manifest"
    with pytest.raises(SignatureError, match="does not match"):
        verify(data + b"!", sign(data, key), [pub])
    with pytest.raises(SignatureError, match="not among"):
        verify(data, sign(data, load_private_key(tmp_path / "stranger.key")), [pub])
    with pytest.raises(SignatureError, match="malformed"):
        verify(data, b"{not json", [pub])
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600


def test_profile_validation(tmp_path: Path) -> None:
    good = tmp_path / "rev-a.yaml"
    good.write_text("name: rev-a\ni2c: {bus: 1, bme680_address: 0x77}\nranges: {temperature_c: {min: -40, max: 85}}\n")
    profile = find_profile("rev-a", [tmp_path / "nowhere", tmp_path])
    assert isinstance(profile, HardwareProfile) and profile.i2c.bme680_address == 0x77
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ni2c: {bus: 1, bme680_address: 0x20}\n")
    with pytest.raises(ProfileError, match="0x76 or 0x77"):
        load_profile(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nuart: {devcie: /dev/ttyS0}\n")
    with pytest.raises(ProfileError, match=r"uart\.devcie"):
        load_profile(typo)
    with pytest.raises(ProfileError, match="no hardware profile"):
        find_profile("absent", [tmp_path])


def test_desired_state_is_signed_over_every_field_but_the_signature(tmp_path: Path) -> None:
    from shared.messages import Desired, DesiredArtefact
    from shared.signing import sign_desired, verify_desired

    pub = generate_private_key(tmp_path / "release.key")
    generate_private_key(tmp_path / "stranger.key")
    trusted = [pub]
    artefact = DesiredArtefact(
        name="cabin-events", version="1.1.0", sha256="ab" * 32, size=41_000, url="http://c:8000/api/v1/models/x"
    )
    desired = Desired(serial=7, issued_at=1_767_225_600.0, model=artefact, rollout_id="r1")
    with pytest.raises(SignatureError, match="not signed"):
        verify_desired(desired, trusted)
    signed = sign_desired(desired, load_private_key(tmp_path / "release.key"))
    # The wire form round-trips and still verifies.
    again = Desired.model_validate_json(signed.model_dump_json())
    assert verify_desired(again, trusted) == pub.key_id
    # Any field changed after signing breaks it: the serial (a replayed older state), the URL, the shadow.
    redirected = artefact.model_copy(update={"url": "http://evil/x"})
    for change in ({"serial": 6}, {"model": redirected}, {"shadow": artefact}):
        with pytest.raises(SignatureError, match="does not match"):
            verify_desired(signed.model_copy(update=change), trusted)
    with pytest.raises(SignatureError, match="not among"):
        verify_desired(sign_desired(desired, load_private_key(tmp_path / "stranger.key")), trusted)

"""The collector's release key, the public keys it publishes for rotation, and the signers a push accepts.

The release key signs every stored bundle (pushes are re-signed) and every desired state. Devices pin
the published public keys, several at once, so a key is rotated by publishing the new key beside the
old one, letting devices pin both, and only then making the new one the release key. A push is
accepted when its bundle is signed by one of ``registry_upload_keys`` or one of the release keys
(bundles made by ``fleet-collector train`` with the release key), and, with ``registry_dev_key``, the
repository's development key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.config import ConfigError, Settings
from shared.signing import PublicKey, load_private_key, load_public_keys, raw_public

log = logging.getLogger(__name__)

DEV_KEY = Path(__file__).resolve().parents[1] / "training" / "dev-release-key.pem"


def public_of(key: Ed25519PrivateKey) -> PublicKey:
    """The public half of a private key."""
    return PublicKey.from_raw(raw_public(key.public_key()))


def _unique(keys: list[PublicKey]) -> list[PublicKey]:
    seen: dict[str, PublicKey] = {}
    for key in keys:
        seen.setdefault(key.key_id, key)
    return list(seen.values())


@dataclass(frozen=True)
class ReleaseKeys:
    """The signing key (None: the collector cannot sign), the published keys and the accepted upload signers."""

    signing: Ed25519PrivateKey | None
    published: list[PublicKey]
    upload: list[PublicKey]

    @property
    def signing_id(self) -> str | None:
        """Key id of the release key, or None."""
        return None if self.signing is None else public_of(self.signing).key_id

    @classmethod
    def from_settings(cls, settings: Settings) -> ReleaseKeys:
        """Load the keys the settings name; an unreadable or invalid key file raises :class:`ConfigError`."""
        try:
            return cls._load(settings)
        except (OSError, ValueError) as exc:  # SignatureError is a ValueError
            raise ConfigError(
                f"release or upload keys (release_key, release_public_keys, registry_upload_keys): {exc}"
            ) from None

    @classmethod
    def _load(cls, settings: Settings) -> ReleaseKeys:
        signing = load_private_key(settings.release_key) if settings.release_key is not None else None
        dev = load_private_key(DEV_KEY) if settings.registry_dev_key else None
        if signing is None and dev is not None:
            log.warning("no release_key: signing with the DEVELOPMENT key %s (registry_dev_key)", DEV_KEY)
            signing = dev
        published = load_public_keys(list(settings.release_public_keys))
        if signing is not None:
            published = [public_of(signing), *published]
        upload = load_public_keys(list(settings.registry_upload_keys)) + published
        if dev is not None:
            upload.append(public_of(dev))
        return cls(signing, _unique(published), _unique(upload))

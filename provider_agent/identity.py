"""The agent's Ed25519 identity: one small JSON file, created on first use, mode 0600.

The file holds the secret key, its public half (so a corrupted or swapped file is caught at
load), a creation time and, once the coordinator assigned one, the `provider_id`. Every write is
atomic (temp file in the same directory, fsync, rename), so a crash never leaves half a key.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provider_agent.errors import IdentityError

log = logging.getLogger(__name__)
FILE_VERSION = 1


@dataclass
class Identity:
    """A loaded identity. `str()`/`repr()` never show the secret."""

    path: Path
    _key: Ed25519PrivateKey
    created_at: str
    provider_id: str | None = None

    @property
    def public_key_b64(self) -> str:
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def sign(self, nonce: bytes) -> str:
        """Base64 of the Ed25519 signature over the decoded nonce bytes (protocol.md §1)."""
        return base64.b64encode(self._key.sign(nonce)).decode()

    def save_provider_id(self, provider_id: str) -> bool:
        """Persist a new or changed provider_id; True when the file was rewritten."""
        if provider_id == self.provider_id:
            return False
        self.provider_id = provider_id
        _write_atomic(self.path, self._document())
        return True

    def _document(self) -> dict[str, Any]:
        secret = self._key.private_bytes_raw()
        return {
            "version": FILE_VERSION,
            "secret_key": base64.b64encode(secret).decode(),
            "public_key": self.public_key_b64,
            "created_at": self.created_at,
            "provider_id": self.provider_id,
        }

    def __repr__(self) -> str:
        return f"Identity(path={str(self.path)!r}, public_key={self.public_key_b64!r})"


def load_or_create(path: Path) -> Identity:
    """Load the identity at `path`, creating a new key there (0600, dir 0700) if none exists."""
    path = path.expanduser()
    if path.exists():
        return load(path)
    identity = Identity(
        path=path,
        _key=Ed25519PrivateKey.generate(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_atomic(path, identity._document())
    log.info("identity created path=%s public_key=%s", path, identity.public_key_b64)
    return identity


def load(path: Path) -> Identity:
    """Load an existing identity; refuse a file whose public key does not match its secret."""
    try:
        mode = path.stat().st_mode
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IdentityError(f"{path}: unreadable identity file ({_reason(exc)})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "identity file %s is readable by group/others (mode %o): run chmod 600",
            path,
            stat.S_IMODE(mode),
        )
    try:
        secret = base64.b64decode(document["secret_key"], validate=True)
        key = Ed25519PrivateKey.from_private_bytes(secret)
        stored_public = str(document["public_key"])
        provider_id = document.get("provider_id")
        created_at = str(document.get("created_at", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise IdentityError(f"{path}: corrupt identity file ({_reason(exc)})") from None
    identity = Identity(path=path, _key=key, created_at=created_at)
    if identity.public_key_b64 != stored_public:
        raise IdentityError(f"{path}: public key does not match the secret key; refusing to use it")
    if provider_id is not None and not isinstance(provider_id, str):
        raise IdentityError(f"{path}: corrupt identity file (provider_id is not a string)")
    identity.provider_id = provider_id
    return identity


def _write_atomic(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _reason(exc: BaseException) -> str:
    """A short reason that never echoes file content (which could be the secret)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]}"
    return type(exc).__name__

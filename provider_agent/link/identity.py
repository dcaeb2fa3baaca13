"""The agent's Ed25519 identity: one small JSON file, created on first use, mode 0600.

The file holds the secret key, its public half (so a corrupted or swapped file is caught at
load), a creation time and, once the coordinator assigned one, the `provider_id`. Every write is
atomic (`provider_agent.store.atomic`), so a crash never leaves half a key. Every failure to create,
read or rewrite the file is an IdentityError: one line, exit 78, never a traceback.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider_agent.errors import IdentityError
from provider_agent.store.atomic import write_atomic

log = logging.getLogger(__name__)
FILE_VERSION = 1
#: A real identity file is a few hundred bytes.
_MAX_FILE_BYTES = 64 * 1024


@dataclass
class Identity:
    """A loaded identity. `str()`/`repr()` never show the secret."""

    path: Path
    _key: Ed25519PrivateKey
    created_at: str
    provider_id: str | None = None
    #: True when `load_or_create` made this key just now (the command line says so).
    created: bool = False

    @property
    def public_key_b64(self) -> str:
        # The `_raw` accessors, not `public_bytes(Encoding.Raw, ...)`: importing
        # `serialization` for its enums loads SSH, PKCS#7/#12 and every cipher with it, +3 MB of
        # resident memory in a process that only signs one nonce per connection.
        return base64.b64encode(self._key.public_key().public_bytes_raw()).decode()

    def sign(self, nonce: bytes) -> str:
        """Base64 of the Ed25519 signature over the decoded nonce bytes (protocol.md §1)."""
        return base64.b64encode(self._key.sign(nonce)).decode()

    def save_provider_id(self, provider_id: str) -> bool:
        """Persist a new or changed provider_id; True when the file was rewritten."""
        if provider_id == self.provider_id:
            return False
        self.provider_id = provider_id
        _write(self.path, self._document(), "cannot save the provider_id")
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
    try:
        path.lstat()
    except FileNotFoundError:
        pass  # create it below
    except OSError as exc:
        raise IdentityError(f"{path}: cannot reach the identity file ({_reason(exc)})") from None
    else:
        return load(path)
    identity = Identity(
        path=path,
        _key=Ed25519PrivateKey.generate(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        created=True,
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(
            f"{path}: cannot create the identity key: cannot create its directory "
            f"({_reason(exc)}); set [identity] key_path to a writable place"
        ) from None
    _write(path, identity._document(), "cannot create the identity key")
    log.info("identity created path=%s public_key=%s", path, identity.public_key_b64)
    return identity


def load(path: Path) -> Identity:
    """Load an existing identity; refuse a file whose public key does not match its secret, and
    one of a version this agent does not know (it would not know how to rewrite it either)."""
    document = _read_document(path)
    version = document.get("version")
    if version != FILE_VERSION or isinstance(version, bool):
        what = f"version {version}" if type(version) is int else "no known version"
        raise IdentityError(
            f"{path}: identity file has {what}; this agent reads version {FILE_VERSION} "
            "(written by a newer or another program?): refusing to use or overwrite it"
        )
    secret_text, stored_public = document.get("secret_key"), document.get("public_key")
    if not isinstance(secret_text, str) or not isinstance(stored_public, str):
        raise IdentityError(f"{path}: corrupt identity file (secret_key or public_key missing)")
    try:
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret_text, validate=True))
    except ValueError:  # not base64, or not 32 bytes
        raise IdentityError(
            f"{path}: corrupt identity file (secret_key is not a base64 Ed25519 key)"
        ) from None
    provider_id = document.get("provider_id")
    if provider_id is not None and not isinstance(provider_id, str):
        raise IdentityError(f"{path}: corrupt identity file (provider_id is not a string)")
    identity = Identity(path=path, _key=key, created_at=str(document.get("created_at", "")))
    if identity.public_key_b64 != stored_public:
        raise IdentityError(f"{path}: public key does not match the secret key; refusing to use it")
    identity.provider_id = provider_id
    return identity


def _read_document(path: Path) -> dict[str, Any]:
    """The file's JSON object; never echoes content (which could be the secret). Only a regular
    file is read: opening a FIFO for reading would wait for a writer (config.md, settled)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                from provider_agent.store.statedir import file_kind

                raise IdentityError(
                    f"{path}: the identity file is {file_kind(mode)}, not a regular file: point "
                    "[identity] key_path at the key file (or remove this, to create a new key)"
                )
            data = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"{path}: unreadable identity file ({_reason(exc)})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "identity file %s is readable by group/others (mode %o): run chmod 600",
            path,
            stat.S_IMODE(mode),
        )
    if len(data) > _MAX_FILE_BYTES:
        raise IdentityError(f"{path}: not an identity file (far too large)")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise IdentityError(f"{path}: corrupt identity file (not JSON)") from None
    if not isinstance(document, dict):
        raise IdentityError(f"{path}: corrupt identity file (not a JSON object)")
    return document


def _write(path: Path, document: dict[str, Any], what: str) -> None:
    data = (json.dumps(document, indent=2) + "\n").encode()
    try:
        write_atomic(path, data, mode=0o600)
    except OSError as exc:
        raise IdentityError(
            f"{path}: {what} ({_reason(exc)}); set [identity] key_path to a writable place"
        ) from None


def _reason(exc: OSError) -> str:
    """The operating system's reason in words ("Permission denied", "Not a directory")."""
    return exc.strerror or "input/output error"

"""The identity file: created 0600 in a 0700 directory, atomic, verified, provider_id kept."""

from __future__ import annotations

import base64
import json
import logging
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provider_agent.errors import IdentityError
from provider_agent.identity import load, load_or_create


def test_created_with_private_modes_and_a_verifiable_signature(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "identity.key"
    identity = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    nonce = b"\x01" * 32
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(identity.public_key_b64))
    public.verify(base64.b64decode(identity.sign(nonce)), nonce)  # raises if wrong
    document = json.loads(path.read_text())
    assert document["provider_id"] is None and document["created_at"]
    assert document["public_key"] == identity.public_key_b64


def test_second_load_is_the_same_key_and_secret_never_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    first = load_or_create(path)
    second = load_or_create(path)
    assert second.public_key_b64 == first.public_key_b64
    secret = json.loads(path.read_text())["secret_key"]
    assert secret not in repr(second) and secret not in str(second)


def test_provider_id_persists_atomically(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    identity = load_or_create(path)
    assert identity.save_provider_id("prov_1") is True
    assert identity.save_provider_id("prov_1") is False  # unchanged: no rewrite
    assert load(path).provider_id == "prov_1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key"]  # no temp files left


def test_mismatched_public_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create(path)
    other = load_or_create(tmp_path / "other.key")
    document = json.loads(path.read_text())
    document["public_key"] = other.public_key_b64
    path.write_text(json.dumps(document))
    with pytest.raises(IdentityError, match="does not match"):
        load(path)


@pytest.mark.parametrize("content", ["not json", "{}", '{"secret_key": "!!", "public_key": "x"}'])
def test_corrupt_file_is_a_one_line_error_without_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "identity.key"
    path.write_text(content)
    with pytest.raises(IdentityError) as caught:
        load(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "identity.key"
    load_or_create(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load(path)
    assert "chmod 600" in caplog.text

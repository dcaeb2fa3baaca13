"""The identity file: created 0600 in a 0700 directory, atomic, verified, provider_id kept."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provider_agent.errors import IdentityError
from provider_agent.link.identity import load, load_or_create


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


def test_created_flag_says_when_the_key_is_new(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    assert load_or_create(path).created is True
    assert load_or_create(path).created is False
    assert load(path).created is False


def _file_where_the_directory_must_be(tmp_path: Path) -> Path:
    (tmp_path / "blocker").write_text("a file, not a directory")
    return tmp_path / "blocker" / "identity.key"


def _file_deeper_than_a_file(tmp_path: Path) -> Path:
    (tmp_path / "blocker").write_text("a file")
    return tmp_path / "blocker" / "sub" / "dir" / "identity.key"


def _name_too_long(tmp_path: Path) -> Path:
    return tmp_path / ("k" * 300)


def _directory_name_too_long(tmp_path: Path) -> Path:
    return tmp_path / ("d" * 300) / "identity.key"


def _symlink_loop(tmp_path: Path) -> Path:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop" / "identity.key"


def _under_a_device(tmp_path: Path) -> Path:
    return Path("/dev/null/provider-agent/identity.key")


def _in_sysfs(tmp_path: Path) -> Path:
    return Path("/sys/identity.key")  # not writable, not even for root


def _new_directory_in_sysfs(tmp_path: Path) -> Path:
    return Path("/sys/kernel/provider-agent-test/identity.key")


@pytest.mark.parametrize(
    "place",
    [
        _file_where_the_directory_must_be,
        _file_deeper_than_a_file,
        _name_too_long,
        _directory_name_too_long,
        _symlink_loop,
        _under_a_device,
        _in_sysfs,
        _new_directory_in_sysfs,
    ],
)
def test_a_key_that_cannot_be_created_is_a_one_line_identity_error(
    tmp_path: Path, place: Callable[[Path], Path]
) -> None:
    path = place(tmp_path)
    with pytest.raises(IdentityError) as caught:
        load_or_create(path)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(str(path))
    assert "Errno" not in line and "Error" not in line
    assert caught.value.__cause__ is None
    with contextlib.suppress(OSError):  # a name too long cannot even be looked up
        assert not path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_directory_without_write_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(IdentityError, match="Permission denied"):
        load_or_create(locked / "identity.key")


def test_saving_the_provider_id_where_it_cannot_be_written_is_an_identity_error(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "id"
    identity = load_or_create(directory / "identity.key")
    identity.path.unlink()
    directory.rmdir()
    directory.write_text("now a file")
    with pytest.raises(IdentityError, match="cannot save the provider_id"):
        identity.save_provider_id("prov_1")


@pytest.mark.parametrize(
    ("version", "shown"),
    [
        (2, "version 2"),
        (0, "version 0"),
        ("1", "no known version"),
        (None, "no known version"),
        (True, "no known version"),
        (1.5, "no known version"),
    ],
)
def test_unknown_version_is_refused(tmp_path: Path, version: Any, shown: str) -> None:
    path = tmp_path / "identity.key"
    load_or_create(path)
    document = json.loads(path.read_text())
    before = path.read_bytes()
    document["version"] = version
    path.write_text(json.dumps(document))
    with pytest.raises(IdentityError) as caught:
        load_or_create(path)
    assert shown in str(caught.value) and "reads version 1" in str(caught.value)
    assert document["secret_key"] not in str(caught.value)
    assert path.read_bytes() != before  # left as the test wrote it: not overwritten


def test_missing_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create(path)
    document = json.loads(path.read_text())
    del document["version"]
    path.write_text(json.dumps(document))
    with pytest.raises(IdentityError, match="no known version"):
        load(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe{}", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"[" * 50_000, "not JSON"),
        (b'{"version": 1, "secret_key": 5, "public_key": "x"}', "secret_key or public_key"),
        (b'{"version": 1, "secret_key": "!!", "public_key": "x"}', "not a base64 Ed25519 key"),
        (b'{"version": 1, "secret_key": "AAAA", "public_key": "x"}', "not a base64 Ed25519 key"),
        (b" " * (70 * 1024), "far too large"),
    ],
)
def test_corrupt_files_say_why_without_python_words(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError) as caught:
        load_or_create(path)
    line = str(caught.value)
    assert reason in line and "\n" not in line
    assert "Error" not in line and "Errno" not in line


def test_a_directory_at_the_key_path_is_an_identity_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir()
    with pytest.raises(IdentityError, match="unreadable identity file"):
        load_or_create(path)

"""Finding agent.toml, reading it (bounded, UTF-8 without a BOM) and validating it against the
schema; every failure is a ConfigError whose `str()` is one line naming file and key."""

from __future__ import annotations

import codecs
import os
import tomllib
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from provider_agent.config.messages import first_error, toml_message
from provider_agent.config.schema import Config
from provider_agent.errors import ConfigError
from provider_agent.safe_text import printable

CONFIG_ENV = "PROVIDER_AGENT_CONFIG"


#: Larger than any real agent.toml by far; a bigger file is a mistake (or /dev/zero).
MAX_FILE_BYTES: Final = 1024 * 1024


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else $PROVIDER_AGENT_CONFIG, else the XDG file if present, else ./agent.toml.

    An empty `--config ""` is a ConfigError (not "not given"). When the search finds nothing, the
    ConfigError names every place it looked."""
    if explicit is not None:
        if not str(explicit).strip():
            raise ConfigError("--config", "", "is empty: give the path of agent.toml")
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    xdg_home = os.environ.get("XDG_CONFIG_HOME")
    xdg = Path(xdg_home or Path.home() / ".config") / "provider-agent" / "agent.toml"
    if xdg.exists():
        return xdg
    cwd = Path("agent.toml")
    if not cwd.exists():
        xdg_name = "$XDG_CONFIG_HOME" if xdg_home else "~/.config"
        where = printable(str(xdg)), printable(str(cwd.absolute()))
        raise ConfigError(
            "agent.toml",
            "",
            f"no such file; looked for {xdg_name}/provider-agent/agent.toml ({where[0]}) "
            f"and ./agent.toml ({where[1]}), as neither --config nor ${CONFIG_ENV} was given "
            "(create one with `provider-agent init`)",
        )
    return cwd


def load(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> Config:
    """Read and validate agent.toml; raise ConfigError (one line, key path named) on any problem."""
    file = printable(str(path))
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            file, "", "no such file (create one with `provider-agent init`)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(file, "", "cannot read: it is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, "", f"is larger than {MAX_FILE_BYTES // 1024} KiB: not a config")
    return parse(decode(data, file), file=file, allow_insecure=allow_insecure)


def decode(data: bytes, file: str = "agent.toml") -> str:
    """UTF-8 without a byte-order mark, as TOML requires; anything else is a one-line ConfigError
    that says what the encoding problem is and what to do."""
    if data.startswith(codecs.BOM_UTF8):
        problem = "starts with a UTF-8 byte-order mark (BOM)"
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        problem = "is UTF-32 encoded (it starts with a UTF-32 byte-order mark)"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problem = "is UTF-16 encoded (it starts with a UTF-16 byte-order mark)"
    elif b"\x00" in data:
        problem = "contains NUL bytes (is it UTF-16 encoded?)"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            problem = (
                f"is not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                "(Latin-1 or Windows-1252?)"
            )
    raise ConfigError(file, "", f"{problem}: save it as UTF-8 without a byte-order mark")


def parse(text: str, *, file: str = "agent.toml", allow_insecure: bool = False) -> Config:
    """Validate TOML text as agent.toml (what `load` does after reading the file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", toml_message(str(exc))) from None
    except RecursionError:
        raise ConfigError(
            file, "", "arrays or inline tables are nested too deeply for the TOML parser"
        ) from None
    try:
        return Config.model_validate(data, context={"allow_insecure": allow_insecure})
    except ValidationError as exc:
        raise first_error(file, exc) from None
    except RecursionError:
        raise ConfigError(file, "", "values are nested too deeply") from None

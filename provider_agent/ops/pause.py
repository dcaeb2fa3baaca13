"""Maintenance pause: the running agent's control socket, the persisted pause, and the client
that `provider-agent pause` / `resume` use (cli.md, protocol.md §2).

The socket is `control.sock` in `state.dir`, mode 0600 (and the peer's uid is checked: only the
agent's user, or root, may pause it). One JSON object per line each way, one request per
connection: `{"op":"pause","for_s":7200,"reason":"…"}`, `{"op":"resume"}`, `{"op":"status"}`;
the answer is a `ControlReply`.

While paused the agent advertises no models (`metadata.status` "paused"), keeps its heartbeats,
lets in-flight jobs finish and answers new ones `shutting_down`. The pause is kept in
`pause.json` beside the socket (written atomically), so a restart during maintenance stays
paused, until `resume` or the end of its duration (wall-clock time, so a reboot counts too).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import anyio
import anyio.abc
import anyio.to_thread
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from provider_agent import clock
from provider_agent.clock import human_duration, utc_ms
from provider_agent.errors import ControlError, ExitCode, NotRunning
from provider_agent.safe_text import printable
from provider_agent.store.atomic import write_atomic

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
PAUSE_FILE = "pause.json"
#: The longest pause `--for` accepts (a longer one is a mistake; `pause` without `--for` lasts
#: until `resume`).
MAX_PAUSE_S = 366 * 86400
MAX_REASON_CHARS = 500
#: A request or reply line longer than this is refused (nothing legitimate comes close).
MAX_LINE_BYTES = 64 * 1024
#: A client that does not finish its request within this is dropped.
REQUEST_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 10.0

#: What `--for` says of a duration beyond MAX_PAUSE_S.
_AT_MOST = "366d (leave --for out to pause until `resume`)"


# --- pure rules ----------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`--for`: `90s`, `30m`, `2h`, `1d` → seconds; ValueError with the line an operator sees."""
    return clock.parse_duration(text, "--for", at_most_s=MAX_PAUSE_S, at_most=_AT_MOST)


def check_reason(reason: str, what: str = "--reason") -> str:
    """A reason is one printable line of at most MAX_REASON_CHARS characters."""
    if not reason.strip():
        raise ValueError(f"{what} is empty: leave it out, or say why the agent is paused")
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"{what} is {len(reason)} characters long: at most {MAX_REASON_CHARS}")
    if not reason.isprintable():
        raise ValueError(f"{what} must be one line of printable text (no control characters)")
    return reason


class PauseState(BaseModel):
    """A pause as `pause.json` keeps it: times are seconds since the epoch (wall clock)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    since: float
    until: float | None = None
    reason: str | None = None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def view(self, now: float) -> PauseView:
        return PauseView(
            since=utc_ms(self.since),
            until=utc_ms(self.until) if self.until is not None else None,
            left_s=round(max(0.0, self.until - now), 1) if self.until is not None else None,
            reason=self.reason,
        )


class PauseView(BaseModel):
    """A pause as the socket, `/status` and `status` show it."""

    since: str
    until: str | None = None
    left_s: float | None = None
    reason: str | None = None

    def describe(self) -> str:
        """`until 2026-11-26T22:15:08Z (1h 59m left)` or `until resume`, and the reason."""
        when = (
            f"until {self.until} ({human_duration(self.left_s or 0)} left)"
            if self.until is not None
            else "until `provider-agent resume`"
        )
        why = f"; reason: {printable(self.reason, MAX_REASON_CHARS)}" if self.reason else ""
        return when + why


# --- the wire ------------------------------------------------------------------------------------


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["pause", "resume", "status"]
    for_s: Annotated[float, Field(gt=0, le=MAX_PAUSE_S, allow_inf_nan=False)] | None = None
    reason: str | None = None

    @field_validator("reason")
    @classmethod
    def _one_printable_line(cls, value: str | None) -> str | None:
        return None if value is None else check_reason(value, "reason")


class ControlReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ok: bool
    error: str | None = None
    #: The pause in force after the request; None when not paused.
    paused: PauseView | None = None
    #: Whether the request changed anything (`resume` when not paused did not).
    changed: bool = False


# --- the agent's side ----------------------------------------------------------------------------


class Pause:
    """The pause and the socket that changes it. `load()` before the first capabilities, then
    run `serve()` in the daemon's task group. `on_change` is called (in the event loop) after
    every pause, resume and expiry: the daemon pushes fresh capabilities."""

    def __init__(
        self,
        state_dir: Path,
        on_change: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / SOCKET_NAME
        self.pause_path = state_dir / PAUSE_FILE
        self.on_change = on_change
        self.clock = clock
        self._state: PauseState | None = None
        self._changed = anyio.Event()

    @property
    def paused(self) -> PauseState | None:
        """The pause in force now (one whose time is up is no longer in force)."""
        state = self._state
        return state if state is not None and state.active(self.clock()) else None

    def view(self) -> PauseView | None:
        state = self.paused
        return state.view(self.clock()) if state is not None else None

    def load(self) -> None:
        """Take up a pause persisted by an earlier run; an unreadable file counts as a pause
        until `resume` (the operator meant maintenance: better idle than selling through it)."""
        try:
            data = _read_regular(self.pause_path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error(
                "pause file %s unreadable (%s): staying paused until `provider-agent resume`",
                self.pause_path,
                exc.strerror or exc,
            )
            self._state = PauseState(since=self.clock(), reason="pause file unreadable")
            return
        try:
            state = PauseState.model_validate_json(data)
        except ValidationError:
            log.error(
                "pause file %s is not a pause this agent wrote: staying paused until "
                "`provider-agent resume`",
                self.pause_path,
            )
            state = PauseState(since=self.clock(), reason="pause file unreadable")
        if not state.active(self.clock()):
            log.info("the pause kept from before the restart has ended; serving")
            self._forget()
            return
        self._state = state
        log.warning("paused (kept from before the restart) %s", state.view(self.clock()).describe())

    async def pause(self, for_s: float | None, reason: str | None) -> PauseState:
        """Pause (replacing a pause in force); OSError when it cannot be persisted, and then
        nothing has changed."""
        now = self.clock()
        until = now + for_s if for_s is not None else None
        state = PauseState(since=now, until=until, reason=reason)
        data = state.model_dump_json().encode()
        await anyio.to_thread.run_sync(lambda: write_atomic(self.pause_path, data, mode=0o600))
        self._state = state
        log.warning("paused by the operator %s", state.view(now).describe())
        self._announce()
        return state

    async def resume(self, why: str = "resumed by the operator") -> bool:
        """End the pause; False when there was none."""
        if self._state is None:
            return False
        self._state = None
        await anyio.to_thread.run_sync(self._forget)
        log.warning("%s: advertising models again", why)
        self._announce()
        return True

    def _forget(self) -> None:
        self._state = None
        try:
            self.pause_path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove the pause file %s: %s", self.pause_path, exc.strerror or exc)

    def _announce(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        self.on_change()

    async def answer(self, request: ControlRequest) -> ControlReply:
        """What one request does (the socket's handler, minus the socket)."""
        changed = False
        if request.op == "pause":
            await self.pause(request.for_s, request.reason)
            changed = True
        elif request.op == "resume":
            changed = await self.resume()
        return ControlReply(ok=True, paused=self.view(), changed=changed)

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The socket and the pause's timer, until cancelled. A socket another live agent
        answers on is left alone (one line), and so is a path that is not a socket."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._expire)
            listener = await self._listen()
            task_status.started()
            if listener is None:
                return  # the timer goes on: a pause still ends on time
            try:
                bound = os.stat(self.socket_path).st_ino
                async with listener:
                    await listener.serve(self._handle, group)
            finally:
                self._remove_socket(bound)

    async def _listen(self) -> anyio.abc.SocketListener | None:
        path = self.socket_path
        try:
            with anyio.fail_after(2):
                stream = await anyio.connect_unix(path)
        except (OSError, TimeoutError):
            pass  # nobody answers there: a leftover of a killed agent, or nothing
        else:
            await stream.aclose()
            log.error(
                "another agent answers on %s (same state.dir?): pause/resume reach that one",
                path,
            )
            return None
        try:
            return await anyio.create_unix_listener(path, mode=0o600)
        except OSError as exc:
            log.error(
                "control socket %s unavailable (%s): pause/resume will not reach this agent",
                path,
                exc.strerror or exc,
            )
            return None

    def _remove_socket(self, inode: int) -> None:
        try:
            if os.stat(self.socket_path).st_ino == inode:
                self.socket_path.unlink()
        except OSError:
            pass  # already gone, or replaced by someone else's: not ours to remove

    async def _expire(self) -> None:
        while True:
            changed = self._changed
            state = self._state
            wait = math.inf
            if state is not None and state.until is not None:
                wait = state.until - self.clock()
                if wait <= 0:
                    await self.resume("the pause's duration has ended")
                    continue
            with anyio.move_on_after(wait):
                await changed.wait()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        """One connection. A bug here costs that request (logged with its traceback), never
        the socket: the listener's task group must not end."""
        async with client:
            try:
                if not _peer_allowed(client):
                    await _send(client, ControlReply(ok=False, error="not the agent's user"))
                    return
                reply = await self._reply_to(client)
            except Exception:
                log.exception("control request failed")
                reply = ControlReply(ok=False, error="internal error in the agent (see its log)")
            await _send(client, reply)

    async def _reply_to(self, client: anyio.abc.SocketStream) -> ControlReply:
        reader = BufferedByteReceiveStream(client)
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                line = await reader.receive_until(b"\n", MAX_LINE_BYTES)
        except TimeoutError:
            return ControlReply(ok=False, error="no complete request in time")
        except anyio.DelimiterNotFound:
            return ControlReply(ok=False, error=f"request longer than {MAX_LINE_BYTES} bytes")
        except (anyio.EndOfStream, anyio.IncompleteRead, OSError):
            return ControlReply(ok=False, error="the request ended before its end of line")
        try:
            request = ControlRequest.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            prefix = f"bad request: {where}: " if where else "bad request: "
            return ControlReply(ok=False, error=printable(prefix + message))
        try:
            return await self.answer(request)
        except OSError as exc:
            return ControlReply(
                ok=False, error=f"cannot write {self.pause_path}: {exc.strerror or exc}"
            )


def _read_regular(path: Path) -> bytes:
    """A small regular file's bytes, never waiting: a FIFO (or a device, a link) put where the
    file should be is an OSError, not a read that waits for a writer. (`run` refuses such a
    state dir before it gets here; this is for one that changed in between.)"""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return handle.read(MAX_LINE_BYTES)


def _peer_allowed(client: anyio.abc.SocketStream) -> bool:
    """The peer runs as our user or as root (the socket's mode says the same; this is the
    second lock, where the platform tells the peer's uid)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    raw = client.extra(anyio.abc.SocketAttribute.raw_socket)
    credentials = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid in (0, os.getuid())


async def _send(client: anyio.abc.SocketStream, reply: ControlReply) -> None:
    try:
        await client.send(reply.model_dump_json(exclude_none=True).encode() + b"\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        log.debug("control client went away before its answer")


# --- the client (`pause`, `resume`) --------------------------------------------------------------


async def call(
    state_dir: Path, request: ControlRequest, timeout_s: float = CLIENT_TIMEOUT_S
) -> ControlReply:
    """Send one request to the agent running with `state_dir`; NotRunning when none answers,
    ControlError for anything else that goes wrong."""
    path = state_dir / SOCKET_NAME
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise NotRunning(f"no agent is running (no control socket at {path})") from None
    except OSError as exc:
        raise ControlError(f"cannot reach {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} is not a socket: is state.dir shared with something else?")
    try:
        with anyio.fail_after(timeout_s):
            stream = await anyio.connect_unix(path)
            async with stream:
                await stream.send(request.model_dump_json(exclude_none=True).encode() + b"\n")
                reader = BufferedByteReceiveStream(stream)
                line = await reader.receive_until(b"\n", MAX_LINE_BYTES)
    except ConnectionRefusedError:
        raise NotRunning(f"no agent is running (nobody answers on {path})") from None
    except PermissionError:
        raise ControlError(
            f"permission denied on {path}: run this as the agent's user (or root)"
        ) from None
    except TimeoutError:
        raise ControlError(f"the agent did not answer on {path} within {timeout_s:g}s") from None
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
        raise ControlError(f"the agent closed {path} without a complete answer") from None
    except OSError as exc:
        raise ControlError(f"cannot use {path}: {exc.strerror or exc}") from None
    try:
        reply = ControlReply.model_validate(orjson.loads(line))
    except (orjson.JSONDecodeError, ValidationError):
        raise ControlError(f"the answer on {path} is not the agent's") from None
    if not reply.ok:
        raise ControlError(f"the agent refused: {printable(reply.error or 'no reason given')}")
    return reply


def pause_command(state_dir: Path, for_text: str | None, reason: str | None) -> int:
    """`provider-agent pause [--for DURATION] [--reason TEXT]`: 0 paused; 2 for a bad DURATION or
    reason (an invalid argument, cli.md); 1 when the agent cannot be asked."""
    try:
        for_s = parse_duration(for_text) if for_text is not None else None
        if reason is not None:
            check_reason(reason)
    except ValueError as exc:
        print(f"pause: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return _ask(state_dir, ControlRequest(op="pause", for_s=for_s, reason=reason))


def resume_command(state_dir: Path) -> int:
    """`provider-agent resume`: 0 resumed, or not paused; 1 when the agent cannot be asked."""
    return _ask(state_dir, ControlRequest(op="resume", for_s=None, reason=None))


def _ask(state_dir: Path, request: ControlRequest) -> int:
    """One request to the running agent, and what it did as one line."""
    try:
        reply = anyio.run(call, state_dir, request)
    except ControlError as exc:
        print(f"{request.op}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    if reply.paused is not None:
        print(f"paused: no models advertised {reply.paused.describe()}")
    elif reply.changed:
        print("resumed: models are advertised again")
    else:
        print("not paused: nothing to resume")
    return ExitCode.OK

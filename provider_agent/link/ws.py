"""The only module that reaches into websockets' internals (`send_context`, `protocol`,
`transport`): the writer's batched, non-awaiting writes and the close code received. Those
internals are not public API, so the tested major versions are named here and a test fails
loudly when the installed websockets moves past them.
"""

from __future__ import annotations

from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State as SocketState

from provider_agent.backends.base import USER_AGENT
from provider_agent.clock import Timings

#: The websockets major versions whose internals this module was tested against.
TESTED_MAJOR_VERSIONS = frozenset({17})
#: The largest frame the coordinator may send (a job's request).
MAX_FRAME_BYTES = 16 * 1024 * 1024


def dial(url: str, timings: Timings) -> connect:
    """The coordinator's WebSocket, as `async with dial(...) as ws` (no compression: frames are
    small JSON, and deflate would cost the relay's hot path)."""
    return connect(
        url,
        ping_interval=timings.ping_interval_s,
        ping_timeout=timings.ping_timeout_s,
        max_size=MAX_FRAME_BYTES,
        compression=None,
        open_timeout=timings.handshake_timeout_s,
        close_timeout=timings.close_timeout_s,
        user_agent_header=USER_AGENT,
    )


async def send_all(ws: ClientConnection, frames: list[str]) -> None:
    """Every frame of a batch in one write and one drain (websockets' own `send()` does one of
    each per frame); raises ConnectionClosed like `send()`."""
    async with ws.send_context():
        for frame in frames:
            ws.protocol.send_text(frame.encode())


def write_at_once(ws: ClientConnection, frames: list[str]) -> bool:
    """Write frames without awaiting, when nothing can make the write wait or fail here: the
    socket is open, not paused by flow control, its transport not closing. Returns False,
    having written nothing, otherwise (then `send_all` waits for the drain or the close)."""
    if ws.protocol.state is not SocketState.OPEN or ws.paused or ws.transport.is_closing():
        return False
    for frame in frames:
        ws.protocol.send_text(frame.encode())
    # One writelines (one writev) for the lot: websockets' `send_data()` writes frame by frame.
    # An open socket's pending data holds frames only, never the end-of-stream marker (b"").
    ws.transport.writelines(ws.protocol.data_to_send())
    return True


def close_code_received(ws: ClientConnection) -> int | None:
    """The close code the coordinator sent (None: the connection ended without a close frame)."""
    received = ws.protocol.close_rcvd
    return received.code if received is not None else None

"""The reference coordinator: the coordinator side of `protocol.md`, for local testing.

Not the marketplace. One process, state in memory, no billing. It exists so the agent can be run
and tested end to end on loopback: it judges every frame an agent sends against the contract
(`contract`), records what it saw for tests to assert on (`records`), relays OpenAI/Anthropic-style
HTTP requests to agents as `job` frames (`front`), and has hooks to misbehave on purpose (refuse,
flap, drop, withhold acks or pongs) so the agent's recovery paths can be exercised without sleeps:
`wait_for()` wakes on every recorded event (`server`).

    async with DevCoordinator(host="127.0.0.1", port=0) as coord:
        ...  # point an agent at coord.ws_url, an HTTP client at coord.http_url
        record = await coord.wait_for(lambda c: c.agents.get(provider_id))
        coord.assert_no_violations()

A violation is logged at warning and appended to `violations`; nothing an agent sends ends its
session except a frame over 16 MiB, which the WebSocket layer refuses (close 1009).
"""

from provider_agent.dev.coordinator.contract import (
    MAX_CHUNK_FRAME_BYTES,
    Verdict,
    check_agent_frame,
    chunk_problems,
    contract_problems,
    terminal_problems,
)
from provider_agent.dev.coordinator.front import (
    HTTP_STATUS_FOR_ERROR,
    JOB_DEADLINE_MS,
    Refusal,
    error_body,
    http_status_for,
    pick_provider,
)
from provider_agent.dev.coordinator.records import (
    HISTORY,
    AgentRecord,
    ConnectionAttempt,
    JobRecord,
    Violation,
)
from provider_agent.dev.coordinator.server import (
    CONNECT_PATH,
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_FRAME_BYTES,
    DevCoordinator,
    parse_listen,
    provider_id_for,
    serve,
)

__all__ = [
    "CONNECT_PATH",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "HISTORY",
    "HTTP_STATUS_FOR_ERROR",
    "JOB_DEADLINE_MS",
    "MAX_CHUNK_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "AgentRecord",
    "ConnectionAttempt",
    "DevCoordinator",
    "JobRecord",
    "Refusal",
    "Verdict",
    "Violation",
    "check_agent_frame",
    "chunk_problems",
    "contract_problems",
    "error_body",
    "http_status_for",
    "parse_listen",
    "pick_provider",
    "provider_id_for",
    "serve",
    "terminal_problems",
]

"""The simulator saturates like a real server: at most `slots` completions generate at once, the
rest wait in arrival order before any byte of their answer (so the wait is in their time to first
byte), and prefill grows with the prompt. Real loopback HTTP; every wait is on an event, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from provider_agent import cli
from provider_agent.dev.sim.command import sim_from_args
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.records import SimRequest
from provider_agent.dev.sim.slots import SlotGate
from tests.dev.test_sim import chat_body

#: Every test's bound on its waits, in seconds.
BOUND = 10


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Timing:
    """A streamed completion as its client saw it (monotonic seconds)."""

    sent: float
    headers: float
    first_byte: float
    body: bytes

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.sent


async def timed(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Timing:
    sent = time.monotonic()
    async with http.post(url, json=body) as response:
        assert response.status == 200
        headers = time.monotonic()
        first = await response.content.readany()
        first_byte = time.monotonic()
        return Timing(sent, headers, first_byte, first + await response.content.read())


def job(sim: SimBackend, name: str) -> SimRequest:
    (rec,) = [r for r in sim.completions if r.key == name]
    return rec


def completions_are(n: int) -> Callable[[SimBackend], bool]:
    """A `wait_for` predicate: the sim has `n` completions, each holding a slot or waiting."""
    return lambda sim: len(sim.completions) == n


async def send_in_order(
    http: aiohttp.ClientSession, sim: SimBackend, names: range, **extra: Any
) -> list[asyncio.Task[Timing]]:
    """Streamed completions `job-N` for N in `names`, each sent once the one before holds a slot
    or waits for one (so their arrival order is their names' order)."""
    tasks = []
    url = sim.url + "/v1/chat/completions"
    for i in names:
        body = chat_body(sim.models[0].name, metadata={"job": f"job-{i}"}, **extra)
        want = completions_are(len(sim.completions) + 1)
        tasks.append(asyncio.create_task(timed(http, url, body)))
        await sim.wait_for(want)
    return tasks


def most_at_once(recs: list[SimRequest]) -> int:
    """The most slots held at once: each from `slot_monotonic` to `finished_monotonic`."""
    edges = []
    for rec in recs:
        assert rec.slot_monotonic is not None and rec.finished_monotonic is not None
        edges += [(rec.slot_monotonic, 1), (rec.finished_monotonic, -1)]
    held = most = 0
    for _, step in sorted(edges):  # an end before a start at the same instant
        held += step
        most = max(most, held)
    return most


async def state(http: aiohttp.ClientSession, sim: SimBackend) -> Any:
    async with http.get(sim.url + "/__sim/state") as response:
        return orjson.loads(await response.read())


async def test_two_slots_serve_five_streams_two_at_a_time_first_come_first_served(
    http: aiohttp.ClientSession,
) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend("vllm", tokens=30, tokens_per_s=100, slots=2) as sim:
            tasks = await send_in_order(http, sim, range(5))
            seen = await state(http, sim)
            timings = await asyncio.gather(*tasks)
    assert (seen["slots"], seen["busy"], seen["queued"]) == (2, 2, 3)
    recs = [job(sim, f"job-{i}") for i in range(5)]
    assert sorted(recs, key=lambda r: r.slot_monotonic or 0) == recs  # FIFO
    assert most_at_once(recs) == 2
    assert all(r.outcome == "ok" and r.tokens_sent == 30 for r in recs)
    assert sum(sim.completed.values()) == 5 and (sim.busy, sim.queued) == (0, 0)
    # The first two start at once; the third starts when a slot frees, and only then do its
    # headers come: its time to first byte is the wait for that slot.
    assert max(t.ttfb for t in timings[:2]) < 0.1
    freed = min(r.finished_monotonic or 0 for r in recs[:2])
    third = timings[2]
    assert third.headers >= freed and third.first_byte >= freed
    one_stream = (recs[0].finished_monotonic or 0) - (recs[0].slot_monotonic or 0)
    assert one_stream >= 0.29
    assert 0.8 * one_stream <= freed - third.sent <= third.ttfb <= freed - third.sent + 0.1
    # Each later wave waits for the one before it.
    assert timings[4].ttfb >= 1.6 * one_stream


def raw_completion(sim: SimBackend, name: str, model: str | None = None) -> socket.socket:
    """A streamed completion on a plain socket (sent whole, nothing read yet)."""
    payload = orjson.dumps(chat_body(model or sim.models[0].name, metadata={"job": name}))
    sock = socket.create_connection((sim.host, sim.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(payload), payload)
    )
    sock.setblocking(False)
    return sock


def nothing_sent(sock: socket.socket) -> bool:
    """Not a byte has come on `sock` (the server writes straight to the socket)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


async def status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = await asyncio.get_running_loop().sock_recv(sock, 4096)
        assert chunk, "the connection closed"
        data += chunk
    return data.partition(b"\r\n")[0]


@contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_raising_slots_at_runtime_starts_the_queued_at_once(
    http: aiohttp.ClientSession,
) -> None:
    with anyio.fail_after(BOUND), closing_all([]) as socks:
        async with SimBackend("llamacpp", tokens=1000, tokens_per_s=100, slots=2) as sim:
            for i in range(5):
                socks.append(raw_completion(sim, f"job-{i}"))
                await sim.wait_for(completions_are(i + 1))
            assert (sim.busy, sim.queued) == (2, 3)
            assert [await status_line(s) for s in socks[:2]] == [b"HTTP/1.1 200 OK"] * 2
            assert all(nothing_sent(s) for s in socks[2:])  # not even the status line
            async with http.post(sim.url + "/__sim/slots", json={"slots": 5}) as response:
                assert response.status == 200
                answer = orjson.loads(await response.read())
            raised = time.monotonic()
            assert [await status_line(s) for s in socks[2:]] == [b"HTTP/1.1 200 OK"] * 3
            recs = [job(sim, f"job-{i}") for i in range(5)]
            assert all(r.finished_monotonic is None for r in recs)  # the first two still run
    assert (answer["slots"], answer["busy"], answer["queued"]) == (5, 5, 0)
    for rec in recs[2:]:
        assert rec.slot_monotonic is not None and rec.slot_monotonic <= raised


async def test_lowering_slots_preempts_none(http: aiohttp.ClientSession) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend("ollama", tokens=20, tokens_per_s=100, slots=3) as sim:
            tasks = await send_in_order(http, sim, range(3))
            sim.slots = 1
            assert (sim.busy, sim.queued) == (3, 0)
            tasks += await send_in_order(http, sim, range(3, 4))
            assert (sim.busy, sim.queued) == (3, 1)
            await asyncio.gather(*tasks)
    running, late = [job(sim, f"job-{i}") for i in range(3)], job(sim, "job-3")
    assert all(r.outcome == "ok" and r.tokens_sent == 20 for r in running)
    assert late.slot_monotonic is not None
    assert late.slot_monotonic >= max(r.finished_monotonic or 0 for r in running)


async def test_a_client_that_leaves_the_queue_frees_nothing() -> None:
    with anyio.fail_after(BOUND), closing_all([]) as socks:
        async with SimBackend("vllm", ["a", "b"], tokens=1000, tokens_per_s=100, slots=1) as sim:
            for name, model in (("holder", "a"), ("leaver", "a"), ("next", "b")):
                socks.append(raw_completion(sim, name, model))  # one slot for both models
                await sim.wait_for(completions_are(len(socks)))
            holder, leaver, after = socks
            assert (sim.busy, sim.queued) == (1, 2)
            leaver.close()
            await sim.wait_for(lambda s: job(s, "leaver").disconnected)
            assert (sim.busy, sim.queued) == (1, 1)  # it held nothing, so freed nothing
            assert nothing_sent(after)
            holder.close()
            await sim.wait_for(lambda s: job(s, "next").slot_monotonic is not None)
            assert await status_line(after) == b"HTTP/1.1 200 OK"
            socks.append(raw_completion(sim, "later"))
            await sim.wait_for(lambda s: s.queued == 1)
            assert sim.busy == 1
    gone = job(sim, "leaver")
    assert (gone.outcome, gone.slot_monotonic, gone.status) == ("disconnected", None, None)
    assert set(sim.served) == {"holder", "next"}  # served: given a slot and answered 200
    assert job(sim, "holder").outcome == "disconnected"
    assert (sim.busy, sim.queued) == (0, 0)  # the sim stopped: every slot and place given back


def prompt_of(tokens: int) -> dict[str, Any]:
    """A body whose prompt is about `tokens` tokens as the simulator estimates them (bytes ÷ 4)."""
    return {"messages": [{"role": "user", "content": "x" * (4 * tokens)}]}


async def test_prefill_grows_the_time_to_first_byte_with_the_prompt(
    http: aiohttp.ClientSession,
) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend(
            "llamacpp", tokens=2, tokens_per_s=1000, ttft_s=0.02, prefill_s_per_1k=0.1
        ) as sim:
            url = sim.url + "/v1/chat/completions"
            timings = [
                await timed(http, url, chat_body("m", **prompt_of(tokens)))
                for tokens in (0, 1000, 2000, 4000)
            ]
    expected = [0.02 + 0.1 * (len(r.body) // 4) / 1000 for r in sim.completions]
    assert [round(e, 2) for e in expected] == [0.02, 0.12, 0.22, 0.42]
    for timing, rec, want in zip(timings, sim.completions, expected, strict=True):
        assert rec.first_write_monotonic is not None and rec.slot_monotonic is not None
        assert want <= rec.first_write_monotonic - rec.slot_monotonic <= want + 0.05
        assert want <= timing.ttfb <= want + 0.1
    # Linear in the prompt: each 1,000 tokens more adds the same.
    base = timings[0].ttfb
    per_1k = [(t.ttfb - base) / k for t, k in zip(timings[1:], (1, 2, 4), strict=True)]
    assert max(per_1k) - min(per_1k) < 0.04


async def test_prefill_holds_the_slot(http: aiohttp.ClientSession) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend("vllm", tokens=1, tokens_per_s=0, slots=1) as sim:
            async with http.post(sim.url + "/__sim/prefill", json={"prefill_s_per_1k": 0.1}) as r:
                assert r.status == 200
            body = chat_body(sim.models[0].name, **prompt_of(2000))
            url = sim.url + "/v1/chat/completions"
            first, second = await asyncio.gather(timed(http, url, body), timed(http, url, body))
    assert first.ttfb >= 0.2 and second.ttfb >= 0.4  # the second waits out the first's prefill


async def test_unset_slots_mean_no_limit(http: aiohttp.ClientSession) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend("ollama", tokens=1000, tokens_per_s=100) as sim:
            url = sim.url + "/v1/chat/completions"
            name = sim.models[0].name
            tasks = [
                asyncio.create_task(timed(http, url, chat_body(name, user=f"u{i}")))
                for i in range(8)
            ]
            await sim.wait_for(lambda s: s.active == 8)  # all eight generate at once
            seen = await state(http, sim)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert (seen["slots"], seen["busy"], seen["queued"]) == (None, 8, 0)
    assert (seen["prefill_s_per_1k"], seen["ttft_s"]) == (0.0, 0.0)
    assert sim.slots is None and sim.prefill_s_per_1k == 0.0


async def test_unstreamed_answers_take_a_slot_too(http: aiohttp.ClientSession) -> None:
    with anyio.fail_after(BOUND):
        async with SimBackend("lmstudio", tokens=10, tokens_per_s=100, slots=1) as sim:
            url = sim.url + "/v1/chat/completions"

            async def whole(name: str) -> int:
                body = chat_body(sim.models[0].name, stream=False, user=name)
                async with http.post(url, json=body) as response:
                    await response.read()
                    return response.status

            assert list(await asyncio.gather(whole("one"), whole("two"))) == [200, 200]
    one, two = job(sim, "one"), job(sim, "two")
    assert two.slot_monotonic is not None and one.finished_monotonic is not None
    assert two.slot_monotonic >= one.finished_monotonic


async def test_discovery_reports_the_slots_and_the_queue(http: aiohttp.ClientSession) -> None:
    with anyio.fail_after(BOUND), closing_all([]) as socks:
        async with SimBackend("llamacpp", tokens=1000, tokens_per_s=100, slots=2) as sim:
            for i in range(3):
                socks.append(raw_completion(sim, f"job-{i}"))
            await sim.wait_for(lambda s: s.queued == 1)
            async with http.get(sim.url + "/props") as response:
                props = orjson.loads(await response.read())
            async with http.get(sim.url + "/slots") as response:
                slots = orjson.loads(await response.read())
            async with http.get(sim.url + "/metrics") as response:
                metrics = await response.text()
    assert props["total_slots"] == 2
    assert [s["is_processing"] for s in slots] == [True, True]
    gauges = {f.name: f.samples[0].value for f in text_string_to_metric_families(metrics)}
    assert gauges["llamacpp:requests_deferred"] == 1


async def test_the_control_endpoints_set_slots_and_prefill(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", ttft_s=0.5) as sim:

        async def set_knobs(path: str, raw: bytes) -> tuple[int, Any]:
            async with http.post(sim.url + "/__sim/" + path, data=raw) as response:
                return response.status, orjson.loads(await response.read())

        status, answer = await set_knobs("slots", b'{"slots": 4}')
        assert (status, answer) == (
            200,
            {"slots": 4, "busy": 0, "queued": 0, "prefill_s_per_1k": 0.0, "ttft_s": 0.5},
        )
        for bad in (
            b"{",
            b"null",
            b"4",
            b"{}",
            b'{"slots": 0}',
            b'{"slots": 1.5}',
            b'{"slots": true}',
            b'{"slots": "2"}',
            b'{"slots": 2, "busy": 0}',
            b'{"prefill_s_per_1k": 1}',
        ):
            assert (await set_knobs("slots", bad))[0] == 400, bad
        assert sim.saturation()["slots"] == 4  # unchanged
        assert (await set_knobs("slots", b'{"slots": null}'))[1]["slots"] is None
        status, answer = await set_knobs("prefill", b'{"prefill_s_per_1k": 0.25}')
        assert (status, answer["prefill_s_per_1k"], answer["ttft_s"]) == (200, 0.25, 0.5)
        status, answer = await set_knobs("prefill", b'{"ttft_s": 0, "prefill_s_per_1k": 1}')
        assert (status, answer["prefill_s_per_1k"], answer["ttft_s"]) == (200, 1.0, 0.0)
        for bad in (
            b"{}",
            b'{"prefill_s_per_1k": -1}',
            b'{"prefill_s_per_1k": NaN}',
            b'{"prefill_s_per_1k": Infinity}',
            b'{"ttft_s": "0.1"}',
            b'{"ttft_s": 0.1, "prefill_s_per_1k": false}',
            b'{"slots": 2}',
        ):
            assert (await set_knobs("prefill", bad))[0] == 400, bad
        assert (sim.prefill_s_per_1k, sim.ttft_s, sim.slots) == (1.0, 0.0, None)
        shown = await state(http, sim)
    assert {k: shown[k] for k in ("slots", "busy", "queued", "prefill_s_per_1k", "ttft_s")} == {
        "slots": None,
        "busy": 0,
        "queued": 0,
        "prefill_s_per_1k": 1.0,
        "ttft_s": 0.0,
    }


def test_bad_saturation_knobs_are_refused() -> None:
    for kwargs in (
        {"slots": 0},
        {"slots": -1},
        {"slots": True},
        {"slots": 2.0},
        {"prefill_s_per_1k": -0.1},
        {"prefill_s_per_1k": float("nan")},
        {"prefill_s_per_1k": float("inf")},
    ):
        with pytest.raises(ValueError):
            SimBackend("vllm", **kwargs)
    sim = SimBackend("vllm", slots=3)
    with pytest.raises(ValueError):
        sim.slots = 0
    assert sim.slots == 3


def sim_args(*argv: str, **extra: Any) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["sim-backend", "--kind", "vllm", *argv])
    for name, value in extra.items():
        setattr(args, name, value)
    return args


def test_the_command_passes_slots_and_prefill_on() -> None:
    plain = sim_from_args(sim_args())
    assert (plain.slots, plain.prefill_s_per_1k) == (None, 0.0)
    sim = sim_from_args(sim_args("--ttft-ms", "50", slots=3, prefill_s_per_1k=0.25))
    assert (sim.slots, sim.prefill_s_per_1k, sim.ttft_s) == (3, 0.25, 0.05)
    with pytest.raises(ValueError, match="slots"):
        sim_from_args(sim_args(slots=0))
    with pytest.raises(ValueError, match="prefill_s_per_1k"):
        sim_from_args(sim_args(prefill_s_per_1k=-1.0))


async def test_a_slot_handed_to_a_waiter_cancelled_that_moment_goes_to_the_next() -> None:
    changed = asyncio.Event()
    gate = SlotGate(1, changed.set)
    holding: list[str] = []

    async def until(predicate: Callable[[], bool]) -> None:
        while not predicate():
            changed.clear()
            await changed.wait()

    async def hold(name: str) -> None:
        async with gate.held():
            holding.append(name)
            await asyncio.Event().wait()

    with anyio.fail_after(BOUND):
        first = gate.held()
        await first.__aenter__()
        handed = asyncio.create_task(hold("handed"))
        last = asyncio.create_task(hold("last"))
        await until(lambda: gate.queued == 2)
        await first.__aexit__(None, None, None)  # hands the slot over without a pause
        assert (gate.busy, gate.queued) == (1, 1)
        handed.cancel()  # before it takes the slot up
        await until(lambda: holding == ["last"])
        assert (gate.busy, gate.queued) == (1, 0)
        last.cancel()
        await asyncio.gather(handed, last, return_exceptions=True)
    assert (gate.busy, gate.queued) == (0, 0)

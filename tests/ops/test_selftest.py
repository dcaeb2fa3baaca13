"""`selftest`: one tiny completion per route through the job executor, against simulated and real
backends; nothing written to the outbox or the ledger; exit codes and signals as cli.md says."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from provider_agent.config.load import load
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.discovery.catalog import Price, Route
from provider_agent.link.protocol import JobDone, JobError, TokenCounts, encode
from provider_agent.observe.heartbeat import FinishedJob
from provider_agent.ops.selftest import (
    MAX_TOKENS,
    Check,
    MemoryStore,
    Report,
    plan,
    render,
    result_of,
    run_selftest,
)
from provider_agent.store.outbox import LedgerEntry, Outbox
from tests.realbackend import MODEL_ALIAS, llamacpp_server

KEY_ENV = "SELFTEST_TEST_KEY"
KEY = "sk-selftest-secret-0123456789"


def route(backend: str, kind: str = "vllm", price: tuple[int, int] = (1, 2)) -> Route:
    return Route(
        backend=backend,
        kind=kind,
        native_id="native",
        price=Price(*price),
        formats=frozenset({"openai"}),
        context_window=None,
        max_concurrent=None,
        priority=0,
        config_index=0,
    )


def config_text(tmp_path: Path, backends: Sequence[SimBackend], extra: str = "") -> str:
    """An agent.toml with one [[backends]] per simulator (named after its kind and port)."""
    entries = "".join(
        f'[[backends]]\nname = "{sim.kind}-{sim.port}"\nkind = "{sim.kind}"\n'
        f'url = "{sim.base_url}"\n'
        + (f'api_key_env = "{KEY_ENV}"\n' if sim.kind in ("openrouter", "venice") else "")
        for sim in backends
    )
    return (
        '[coordinator]\nurl = "wss://coordinator.example/provider/connect"\n'
        f'[identity]\nkey_path = "{tmp_path / "identity.key"}"\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        "[discovery]\ntimeout_s = 5\n"
        f"{entries}"
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        f"{extra}"
    )


def write(tmp_path: Path, backends: Sequence[SimBackend], extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(config_text(tmp_path, backends, extra))
    return path


async def selftest(path: Path, *, include_all: bool = False) -> Report:
    return await run_selftest(load(path, allow_insecure=True), include_all=include_all)


async def cli(*args: str) -> tuple[int, str, str]:
    """`provider-agent ARGS` as a real process, awaited without blocking the simulators."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
    env[KEY_ENV] = KEY
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "provider_agent", *args], env=env, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@asynccontextmanager
async def sims(*specs: tuple[str, list[str]]) -> AsyncIterator[list[SimBackend]]:
    """Simulators as fast as possible (`tokens_per_s=0`), each answering 12 tokens at most."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(SimBackend(kind, models, tokens=12, tokens_per_s=0))
            for kind, models in specs
        ]


# --- which routes: pure --------------------------------------------------------------------------


def test_every_local_route_and_only_the_cheapest_model_of_each_byok_backend() -> None:
    routes = {
        "shared": (route("gpu"), route("or", "openrouter", (50, 50))),
        "or-cheap": (route("or", "openrouter", (10, 20)),),
        "or-dear": (route("or", "openrouter", (10, 21)),),
        "ven-b": (route("ven", "venice", (5, 5)),),
        "ven-a": (route("ven", "venice", (5, 5)),),  # a tie: the lower model id
        "local": (route("gpu"), route("cpu", "llamacpp")),
    }
    tried, not_tried = plan(routes, include_all=False)
    assert [(c.model_id, c.route.backend) for c in tried] == [
        ("local", "gpu"),
        ("local", "cpu"),
        ("or-cheap", "or"),
        ("shared", "gpu"),
        ("ven-a", "ven"),
    ]
    assert [(c.model_id, c.route.backend) for c in not_tried] == [
        ("or-dear", "or"),
        ("shared", "or"),
        ("ven-b", "ven"),
    ]
    every, none = plan(routes, include_all=True)
    assert len(every) == 8 and none == ()
    assert plan({}, include_all=False) == ((), ())
    local, left_out = plan(routes, include_all=True, local_only=True)
    assert [(c.model_id, c.route.backend) for c in local] == [
        ("local", "gpu"),
        ("local", "cpu"),
        ("shared", "gpu"),
    ]
    assert {c.route.kind for c in left_out} == {"openrouter", "venice"} and len(left_out) == 5


def test_a_row_from_each_kind_of_terminal_frame() -> None:
    check = Check("m", route("gpu"))
    done = encode(
        JobDone(
            job_id="j",
            tokens=TokenCounts(input=5, output=8, input_tokens=5, output_tokens=8),
            duration_ms=40,
        )
    )
    timing = FinishedJob(1.0, 12.34, output_tokens=8, generation_s=0.5, error_code=None)
    row = result_of(check, done, timing)
    assert (row.ok, row.ttft_ms, row.tokens_per_s, row.output_tokens) == (True, 12.3, 16.0, 8)
    hostile = "upstream said \x1b[31mno\r\nINFO forged line"
    failed = encode(JobError(job_id="j", error_code="backend_error", message=hostile))
    row = result_of(check, failed, None)
    assert not row.ok and row.error is not None
    assert row.error.startswith("backend_error: upstream said")
    assert "\x1b" not in row.error and "\n" not in row.error and "\r" not in row.error
    garbage = result_of(check, "not a frame", None)
    assert not garbage.ok and garbage.error is not None and garbage.error.startswith("internal")
    table = render(Report((row,)))
    assert "FAIL" in table and "1 failed" in table and "\x1b" not in table


async def test_the_memory_store_keeps_the_first_frame_and_records_nothing_else() -> None:
    store = MemoryStore()
    assert not store.in_store("j")
    await store.accept("j", "m")
    assert store.in_store("j") and await store.stored_frame("j") is None
    ledger = LedgerEntry("m", "gpu", "job_done", 1, 1, "reported", 1, 1)
    assert await store.finish("j", "first", ledger) == "first"
    assert await store.finish("j", "second", ledger) == "first"
    assert await store.ended("j") == "first" and await store.orphans() == []


# --- against simulated backends ------------------------------------------------------------------


async def test_local_only_leaves_byok_backends_out_even_without_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`upgrade` gates a release with `selftest --local` from a root shell, which holds none of
    the service's API keys: the BYOK backend is neither discovered nor tried."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    async with sims(("vllm", ["local-model"]), ("openrouter", ["or/model"])) as (gpu, byok):
        path = write(tmp_path, [gpu, byok])
        report = await run_selftest(load(path, allow_insecure=True), local_only=True)
        code, out, err = await cli(
            "--allow-insecure", "--config", str(path), "selftest", "--local", "--json"
        )
        everything = await selftest(path)
    assert report.ok and [r.backend for r in report.results] == [f"vllm-{gpu.port}"]
    assert byok.requests == []  # not even discovered
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["results"]] == [f"vllm-{gpu.port}"]
    # Without --local the keyless BYOK backend is a failed row, as it always was.
    assert not everything.ok


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_every_route_answers_and_nothing_is_recorded(tmp_path: Path) -> None:
    """Both routes of the shared model are tried (a fallback would hide a broken one); each
    completion asks for MAX_TOKENS; the outbox and ledger files are left byte for byte."""
    state = tmp_path / "state"
    async with await Outbox.open(state) as outbox:  # a served job, as a running agent leaves it
        await outbox.accept("served-1", "shared")
        ledger = LedgerEntry("shared", "gpu", "job_done", 3, 4, "reported", 1, 1)
        await outbox.finish("served-1", '{"type":"job_done"}', ledger)
    before = _snapshot(state)
    async with sims(("vllm", ["shared", "big"]), ("ollama", ["shared"])) as (one, two):
        report = await selftest(write(tmp_path, [one, two]))
    assert report.ok, report
    rows = {(r.model, r.backend) for r in report.results}
    assert rows == {
        ("big", f"vllm-{one.port}"),
        ("shared", f"vllm-{one.port}"),
        ("shared", f"ollama-{two.port}"),
    }
    for row in report.results:
        assert 1 <= row.output_tokens <= MAX_TOKENS
        assert row.ttft_ms is not None and row.tokens_per_s is not None
    bodies = [r.json() for sim in (one, two) for r in sim.completions]
    assert len(bodies) == 3
    assert all(b["max_tokens"] == MAX_TOKENS and b["stream"] is True for b in bodies)
    assert _snapshot(state) == before


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(kind="http", status=500), "backend_error: "),
        (Fault(kind="http", status=401), "auth_rejected_by_backend: "),
        (Fault(kind="http", status=404), "model_not_loaded: "),
        (Fault(kind="die", after_tokens=2), "backend_error: vllm: the answer broke off"),
        (Fault(kind="error", after_tokens=1), "error event mid-stream"),
    ],
    ids=["500", "401", "404", "die", "error-event"],
)
async def test_a_faulty_backend_fails_its_own_rows_only(
    tmp_path: Path, fault: Fault, expected: str
) -> None:
    async with sims(("vllm", ["shared"]), ("ollama", ["shared"])) as (bad, good):
        bad.fault = fault
        report = await selftest(write(tmp_path, [bad, good]))
    assert not report.ok
    by_backend = {r.backend: r for r in report.results}
    failed = by_backend[f"vllm-{bad.port}"]
    assert not failed.ok and failed.error is not None and expected in failed.error
    assert by_backend[f"ollama-{good.port}"].ok
    assert len(good.completions) == 1  # no fallback onto the healthy route


async def test_a_backend_down_at_discovery_is_a_failed_row(tmp_path: Path) -> None:
    async with sims(("vllm", ["m"]), ("ollama", ["n"])) as (up, down):
        await down.kill()
        report = await selftest(write(tmp_path, [up, down]))
    assert not report.ok
    [failed] = [r for r in report.results if not r.ok]
    assert failed.model is None and failed.backend == f"ollama-{down.port}"
    assert failed.error is not None and failed.error.startswith("discovery: ")
    assert [r.model for r in report.results if r.ok] == ["m"]


async def test_byok_cheapest_model_only_unless_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    prices = (
        '[pricing.models."or/dear"]\ninput_per_1m = 900000\noutput_per_1m = 900000\n'
        '[pricing.models."or/cheap"]\ninput_per_1m = 100000\noutput_per_1m = 100000\n'
    )
    async with sims(("openrouter", ["or/dear", "or/cheap", "or/mid"])) as [upstream]:
        path = write(tmp_path, [upstream], prices)
        cheapest = await selftest(path)
        every = await selftest(path, include_all=True)
    assert [r.model for r in cheapest.results] == ["or/cheap"] and cheapest.ok
    assert {c.model_id for c in cheapest.not_tried} == {"or/dear", "or/mid"}
    assert "not tried: 2 more model(s)" in render(cheapest)
    assert sorted(r.model or "" for r in every.results) == ["or/cheap", "or/dear", "or/mid"]
    assert every.ok and every.not_tried == ()
    sent = [r.json()["model"] for r in upstream.completions]
    assert sent == ["or/cheap", "or/cheap", "or/dear", "or/mid"]


# --- the command ---------------------------------------------------------------------------------


async def test_command_exit_codes_table_and_json(tmp_path: Path) -> None:
    async with sims(("vllm", ["m1", "m2"])) as [sim]:
        path = str(write(tmp_path, [sim]))
        code, out, err = await cli("selftest", "--config", path)
        assert code == 0, err
        assert out.splitlines()[0].split() == [
            "MODEL",
            "BACKEND",
            "OK",
            "TTFT",
            "MS",
            "TOKENS/S",
            "ERROR",
        ]
        assert "2 completion(s) of at most 8 tokens; all ok" in out
        code, out, err = await cli("selftest", "--json", "--config", path)
        assert code == 0, err
        document = json.loads(out)
        assert document["ok"] is True
        assert [r["model"] for r in document["results"]] == ["m1", "m2"]
        sim.fault = Fault(kind="http", status=503)
        code, out, err = await cli("selftest", "--config", path)
    assert code == 1
    assert out.count("FAIL") == 2 and "backend_error" in out and "2 failed" in out


async def test_no_model_advertised_exits_1_and_says_so(tmp_path: Path) -> None:
    code, out, _ = await cli("selftest", "--config", str(write(tmp_path, [])))
    assert code == 1
    assert "no model advertised" in out


async def test_config_error_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[coordinator\n")
    code, out, err = await cli("selftest", "--config", str(path))
    assert code == 78 and out == ""
    assert err.startswith("config error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
async def test_a_signal_abandons_the_selftest_and_exits_0_or_130(
    tmp_path: Path, signum: signal.Signals, exit_code: int
) -> None:
    """cli.md (settled): every command stops promptly, 0 for SIGTERM and 130 for SIGINT."""
    async with sims(("vllm", ["m"])) as [sim]:
        sim.fault = Fault(kind="hang")  # the completion never answers
        command = [
            sys.executable,
            "-m",
            "provider_agent",
            "selftest",
            "--config",
            str(write(tmp_path, [sim])),
        ]
        async with await anyio.open_process(command) as process:
            await sim.wait_for(lambda s: [r for r in s.requests if r.outcome == "hung"], 30)
            process.send_signal(signum)
            with anyio.fail_after(10):
                code = await process.wait()
            assert process.stdout is not None and process.stderr is not None
            out = b"".join([chunk async for chunk in process.stdout])
            err = b"".join([chunk async for chunk in process.stderr])
        await sim.wait_for(lambda s: s.disconnects, timeout=5)  # the request was abandoned
    assert code == exit_code, err
    assert out == b""  # the work is abandoned: no table
    assert b"selftest: stopped before it finished" in err


# --- against the real llama.cpp-based server -----------------------------------------------------


@pytest.mark.realbackend
async def test_selftest_passes_against_the_real_llamacpp_server(tmp_path: Path) -> None:
    with llamacpp_server(tmp_path / "llamacpp") as url:
        path = tmp_path / "agent.toml"
        path.write_text(
            '[coordinator]\nurl = "wss://coordinator.example/provider/connect"\n'
            f'[identity]\nkey_path = "{tmp_path / "identity.key"}"\n'
            f'[state]\ndir = "{tmp_path / "state"}"\n'
            f'[[backends]]\nname = "real"\nkind = "llamacpp"\nurl = "{url}"\n'
            "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        )
        code, out, err = await cli("selftest", "--json", "--config", str(path))
    assert code == 0, err
    [row] = json.loads(out)["results"]
    assert (row["model"], row["backend"], row["ok"]) == (MODEL_ALIAS, "real", True)
    # random weights may end the answer at once: a complete stream is ok with no token at all
    assert 0 <= row["output_tokens"] <= MAX_TOKENS and row["ttft_ms"] > 0
    assert not (tmp_path / "state").exists()  # no outbox opened, no ledger row

"""`provider-agent doctor`: the grading rules table-tested, then real peers — a fresh machine
with nothing running, everything running (reference coordinator, simulated backends, the agent),
and coordinators that break in each way the check tells apart."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import anyio
import orjson
import pynvml
import pytest
from aiohttp import web

from provider_agent.config.load import load
from provider_agent.config.schema import BackendConfig, Config
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.discovery.catalog import Price, Route
from provider_agent.link.identity import load_or_create
from provider_agent.observe.telemetry import PACKAGE_MISSING
from provider_agent.ops import doctor
from provider_agent.ops.doctor import (
    Check,
    check_coordinator,
    check_identity,
    check_nvml,
    check_outbox,
    check_systemd,
    grade_free_space,
    grade_hardening,
    grade_key_mode,
    grade_outbox,
    grade_skew,
    overall,
    pick_route,
    render,
    run_checks,
    to_json,
)
from provider_agent.store.outbox import Outbox
from tests.agent_harness import agent_where, running_agent, write_config
from tests.nvml_stand_in import StandInGpu, StandInNvml, gpu_lost

KEY_ENV = "R2OPS_DOCTOR_TEST_KEY"

# --- grading rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "grade"),
    [
        (stat.S_IFREG | 0o600, "ok"),
        (stat.S_IFREG | 0o400, "ok"),
        (stat.S_IFREG | 0o640, "fail"),
        (stat.S_IFREG | 0o644, "fail"),
        (stat.S_IFREG | 0o604, "fail"),
        (stat.S_IFDIR | 0o700, "fail"),
    ],
)
def test_identity_key_mode(mode: int, grade: str) -> None:
    check = grade_key_mode(Path("/k"), mode)
    assert check.grade == grade
    assert (check.hint is None) == (grade == "ok")


@pytest.mark.parametrize(
    ("free", "grade"),
    [(0, "fail"), (99 * 2**20, "fail"), (500 * 2**20, "warn"), (2**30, "ok"), (2**40, "ok")],
)
def test_free_space(free: int, grade: str) -> None:
    assert grade_free_space(Path("/s"), free).grade == grade


@pytest.mark.parametrize(
    ("skew", "grade"), [(0.0, "ok"), (-9.0, "ok"), (12.0, "warn"), (-400.0, "fail"), (3600, "fail")]
)
def test_clock_skew(skew: float, grade: str) -> None:
    check = grade_skew(skew)
    assert check.grade == grade
    if grade != "ok":
        assert "ahead" in check.detail if skew > 0 else "behind" in check.detail
        assert check.hint is not None and "timedatectl" in check.hint


@pytest.mark.parametrize(
    ("depth", "oldest", "grade"),
    [
        (0, None, "ok"),
        (3, 5.0, "ok"),
        (3, 7200.0, "ok"),
        (3, 2 * 86400.0, "warn"),
        (1, 29.5 * 86400, "fail"),
    ],
)
def test_outbox_depth_and_age(depth: int, oldest: float | None, grade: str) -> None:
    assert grade_outbox(depth, oldest).grade == grade


HARDENED = "Name:\tpython\nNoNewPrivs:\t1\nSeccomp:\t2\nCapEff:\t0000000000000000\n"
PLAIN = "Name:\tpython\nNoNewPrivs:\t0\nSeccomp:\t0\nCapEff:\t000001ffffffffff\n"


def test_systemd_hardening_as_the_kernel_applies_it() -> None:
    assert grade_hardening(HARDENED, uid=999).grade == "ok"
    plain = grade_hardening(PLAIN, uid=0)
    assert plain.grade == "warn" and plain.hint is not None and "service install" in plain.hint
    for lacking in ("NoNewPrivileges", "system call filter", "capability", "non-root"):
        assert lacking in plain.detail
    assert grade_hardening(HARDENED, uid=0).detail == "the unit lacks a non-root user"


def test_systemd_is_checked_only_under_systemd() -> None:
    assert check_systemd({}) == []
    [check] = check_systemd({"INVOCATION_ID": "0123"})  # this test process: not hardened
    assert check.name == "systemd" and check.grade in ("ok", "warn")


def make_route(backend: str, model: str, price: int) -> Route:
    return Route(
        backend, "openrouter", model, Price(price, price), frozenset({"openai"}), None, None, 0, 0
    )


def test_the_completion_goes_to_the_first_local_model_and_the_cheapest_byok_one() -> None:
    local = BackendConfig.model_validate({"kind": "vllm", "url": "http://127.0.0.1:8000"})
    byok = BackendConfig.model_validate({"kind": "openrouter", "api_key_env": KEY_ENV})
    routes = {
        "b": (make_route(local.label, "b", 5), make_route(byok.label, "b", 5)),
        "a": (make_route(local.label, "a", 9),),
        "dear": (make_route(byok.label, "dear", 90),),
        "cheap": (make_route(byok.label, "cheap", 2),),
    }
    first = pick_route(routes, local)
    cheapest = pick_route(routes, byok)
    assert first is not None and first.native_id == "a"
    assert cheapest is not None and cheapest.native_id == "cheap"
    other = BackendConfig.model_validate({"kind": "ollama", "url": "http://127.0.0.1:11434"})
    assert pick_route(routes, other) is None


def test_text_and_json_reports() -> None:
    checks = [
        Check("config", "ok", "fine", None),
        Check("backend x", "fail", "refused", "start it"),
        Check("agent", "warn", "not running", "run it"),
    ]
    text = render(checks)
    assert text.splitlines()[0].startswith("ok    config")
    assert "FAIL  backend x" in text and "fix: start it" in text and "fix: run it" in text
    assert text.endswith("1 ok, 1 warn, 1 fail")
    data = orjson.loads(to_json(checks))
    assert data["ok"] is False and data["checks"][1]["hint"] == "start it"
    assert overall(checks) == 1 and overall(checks[::2]) == 0


# --- local checks against real files -------------------------------------------------------------


async def test_identity_files_as_operators_leave_them(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    config = load(cfg, allow_insecure=True)
    [missing] = check_identity(config)
    assert missing.grade == "warn" and "identity" in (missing.hint or "")
    key = config.identity.key_path

    load_or_create(key)
    [fresh] = check_identity(config)
    assert fresh.grade == "warn" and "enrollment" in fresh.detail  # not enrolled, no code
    key.chmod(0o644)
    [loose] = check_identity(config)
    assert loose.grade == "fail" and loose.hint == f"chmod 600 {key}"
    key.chmod(0o600)
    key.write_text('{"version": 1, "secret_key": "AAAA", "public_key": "x"}')
    key.chmod(0o600)
    [corrupt] = check_identity(config)
    assert corrupt.grade == "fail" and "backup" in (corrupt.hint or "")


async def test_undelivered_billing_records_are_counted_read_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    two_days_ago = datetime.now(UTC).timestamp() - 2 * 86400 - 7200
    async with await Outbox.open(state, clock=lambda: two_days_ago) as outbox:
        for job_id in ("j1", "j2"):
            await outbox.accept(job_id, "m")
            frame = orjson.dumps(
                {"type": "job_error", "job_id": job_id, "error_code": "internal", "message": ""}
            ).decode()
            await outbox.finish(job_id, frame, None)
    before = {p.name: p.stat().st_mtime_ns for p in state.iterdir()}
    [check] = await check_outbox(state)
    assert check.grade == "warn" and check.detail.startswith("2 billing record(s)")
    assert "2d" in check.detail
    assert {p.name: p.stat().st_mtime_ns for p in state.iterdir()} == before
    [none] = await check_outbox(tmp_path / "elsewhere")
    assert none.grade == "ok" and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100])
async def test_an_outbox_that_is_not_a_database_fails(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "outbox.sqlite3").write_bytes(content)
    [check] = await check_outbox(tmp_path)
    assert check.grade == ("ok" if not content else "fail")


# --- NVML, through a stand-in with its API shape (no GPU on this machine) ------------------------


def config_for(tmp_path: Path) -> Config:
    return load(write_config(tmp_path, "ws://127.0.0.1:9/x"), allow_insecure=True)


async def test_nvml_lists_the_driver_and_the_gpus(tmp_path: Path) -> None:
    nvml = StandInNvml(StandInGpu(), StandInGpu(uuid="GPU-2", name=b"NVIDIA L40S", temperature=41))
    [check] = await check_nvml(config_for(tmp_path), lambda: nvml)
    assert check == Check(
        "nvml",
        "ok",
        "driver 580.65.06: 2 GPU(s): 0: NVIDIA H100 80GB HBM3 (64 C), 1: NVIDIA L40S (41 C)",
    )


async def test_an_unhealthy_gpu_fails_saying_why(tmp_path: Path) -> None:
    nvml = StandInNvml(StandInGpu(), StandInGpu(uuid="GPU-2", temperature=95, slowdown=90))
    nvml.gpus[0].errors["nvmlDeviceGetMemoryInfo"] = gpu_lost()
    [check] = await check_nvml(config_for(tmp_path), lambda: nvml)
    assert check.grade == "fail" and check.hint and "nvidia-smi" in check.hint
    assert "GPU 0: memory not answering: " in check.detail
    assert "GPU 1: temperature 95 C at or above its slowdown 90 C" in check.detail


async def test_nvml_that_hangs_fails_within_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = StandInNvml(StandInGpu())
    nvml.hang_in = "nvmlInit"
    monkeypatch.setattr(doctor, "NVML_TIMEOUT_S", 0.2)
    try:
        with anyio.fail_after(10):  # generous: proves the 0.2 s budget ends the wait
            [check] = await check_nvml(config_for(tmp_path), lambda: nvml)
    finally:
        nvml.release.set()
    assert nvml.hanging.is_set()
    assert check.grade == "fail" and "did not answer within 0.2s" in check.detail


async def test_nvml_that_raises_means_no_driver_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    config = config_for(tmp_path)
    monkeypatch.setattr(doctor, "nvidia_device_present", lambda: False)
    [absent] = await check_nvml(config, lambda: StandInNvml(StandInGpu(), init_error=error))
    assert absent.grade == "ok" and "no NVIDIA driver" in absent.detail
    monkeypatch.setattr(doctor, "nvidia_device_present", lambda: True)
    [broken] = await check_nvml(config, lambda: StandInNvml(StandInGpu(), init_error=error))
    assert broken.grade == "fail" and "Driver Not Loaded" in broken.detail


async def test_nvml_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(tmp_path)
    monkeypatch.setattr(doctor, "nvidia_device_present", lambda: True)
    [missing] = await check_nvml(config, lambda: PACKAGE_MISSING)
    assert missing.grade == "warn" and missing.hint and "nvidia-ml-py" in missing.hint
    no_library = "NVML unavailable (libnvidia-ml.so.1: cannot open shared object file)"
    [broken] = await check_nvml(config, lambda: no_library)
    assert broken.grade == "fail" and "libnvidia-ml.so.1" in broken.detail
    monkeypatch.setattr(doctor, "nvidia_device_present", lambda: False)
    [none] = await check_nvml(config, lambda: PACKAGE_MISSING)
    assert none.grade == "ok" and "no NVIDIA driver" in none.detail
    [no_driver] = await check_nvml(config, lambda: no_library)
    assert no_driver.grade == "ok" and "no NVIDIA driver" in no_driver.detail


async def test_nvml_is_not_asked_with_telemetry_off(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/x", extra='[telemetry]\ngpu = "off"\n')
    nvml = StandInNvml(StandInGpu())
    [check] = await check_nvml(load(cfg, allow_insecure=True), lambda: nvml)
    assert check.grade == "ok" and nvml.calls == []


# --- coordinators, each broken in its own way ----------------------------------------------------


@asynccontextmanager
async def http_server(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def coordinator_checks(tmp_path: Path, url: str) -> list[Check]:
    config = load(write_config(tmp_path, url), allow_insecure=True)
    return await check_coordinator(config)


async def test_a_wrong_path_is_an_upgrade_refused(tmp_path: Path) -> None:
    async with DevCoordinator(host="127.0.0.1", port=0) as coord:
        [check] = await coordinator_checks(tmp_path, f"ws://127.0.0.1:{coord.port}/nope")
    assert check.grade == "fail" and "HTTP 404" in check.detail and "path" in (check.hint or "")


async def test_a_websocket_that_is_not_a_coordinator(tmp_path: Path) -> None:
    async def hello(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"type":"hello"}')
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/provider/connect", hello)
    async with http_server(app) as port:
        [check] = await coordinator_checks(tmp_path, f"ws://127.0.0.1:{port}/provider/connect")
    assert check.grade == "fail" and "no auth_challenge" in check.detail


async def test_a_coordinator_whose_clock_is_an_hour_off(tmp_path: Path) -> None:
    async def skewed(request: web.Request) -> web.WebSocketResponse:
        hour_ago = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
        ws = web.WebSocketResponse()
        ws.headers["Date"] = hour_ago
        await ws.prepare(request)
        await ws.send_str('{"type":"auth_challenge","nonce":"AAAA"}')
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/provider/connect", skewed)
    async with http_server(app) as port:
        checks = await coordinator_checks(tmp_path, f"ws://127.0.0.1:{port}/provider/connect")
    assert [c.grade for c in checks] == ["ok", "fail"]
    assert checks[1].name == "clock" and "ahead of the coordinator" in checks[1].detail


async def test_wss_to_a_server_without_tls_fails_at_tls(tmp_path: Path) -> None:
    async with http_server(web.Application()) as port:
        [check] = await coordinator_checks(tmp_path, f"wss://127.0.0.1:{port}/provider/connect")
    assert check.grade == "fail" and check.detail.startswith("TLS with 127.0.0.1")
    assert "CA certificates" in (check.hint or "")


async def test_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    [check] = await coordinator_checks(tmp_path, "ws://nosuchhost-r2ops-doctor:8765/x")
    assert check.grade == "fail" and check.detail.startswith("cannot resolve nosuchhost")


# --- whole runs ----------------------------------------------------------------------------------


async def doctor_cli(config: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "STATE_DIRECTORY")}
    env[KEY_ENV] = "sk-doctor-test"
    command = [sys.executable, "-m", "provider_agent", "doctor", "--config", str(config)]
    done = await anyio.run_process([*command, "--allow-insecure", *args], check=False, env=env)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


async def test_a_fresh_machine_with_nothing_running_fails_each_backend_and_the_coordinator(
    tmp_path: Path,
) -> None:
    closed = []
    for _ in range(3):  # ports that were just free: nothing listens there
        async with http_server(web.Application()) as port:
            closed.append(port)
    cfg = write_config(
        tmp_path,
        f"ws://127.0.0.1:{closed[0]}/provider/connect",
        backend_urls=(f"http://127.0.0.1:{closed[1]}", f"http://127.0.0.1:{closed[2]}"),
    )
    before = tree(tmp_path)
    code, out, err = await doctor_cli(cfg)
    assert code == 1, out + err
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 3, out
    assert sum("backend vllm:" in line for line in failed) == 2
    assert any("coordinator" in line and "Connection refused" in line for line in failed)
    for index, line in enumerate(lines):
        if line.startswith("FAIL"):
            assert lines[index + 1].lstrip().startswith("fix: ")
    assert tree(tmp_path) == before  # it changed nothing: no key, no state dir, no outbox
    code, out, _ = await doctor_cli(cfg, "--json")
    data = orjson.loads(out)
    assert code == 1 and data["ok"] is False
    assert {c["name"] for c in data["checks"] if c["grade"] == "fail"} >= {"coordinator"}


async def test_everything_running_is_all_ok_and_the_coordinator_sees_no_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-doctor-test")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    async with (
        DevCoordinator(host="127.0.0.1", port=0) as coord,
        SimBackend("vllm", ["m"], tokens_per_s=0) as local,
        SimBackend("openrouter", ["a/dear", "b/cheap"], api_key="sk-doctor-test") as byok,
    ):
        extra = (
            f'[[backends]]\nkind = "openrouter"\nurl = "{byok.base_url}"\n'
            f'api_key_env = "{KEY_ENV}"\n'
            '[pricing.models]\n"a/dear" = { input_per_1m = 9000000, output_per_1m = 9000000 }\n'
            '"b/cheap" = { input_per_1m = 1000, output_per_1m = 1000 }\n'
        )
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(local.base_url,), extra=extra)
        async with running_agent(cfg) as daemon:
            await agent_where(coord, lambda a: len(a.offers()) == 3)
            checks = await run_checks(daemon.config, cfg)
            assert [c for c in checks if c.grade != "ok"] == [], render(checks)
            code, out, err = await doctor_cli(cfg)
            assert code == 0, out + err
            assert out.rstrip().endswith(f"{len(checks)} ok, 0 warn, 0 fail")
        names = [c.name for c in checks]
        for expected in ("config", "identity", "state dir", "disk space", "agent", "coordinator"):
            assert expected in names
        assert {"clock", "nvml", "outbox"} <= set(names)
        models = [r.json()["model"] for r in byok.requests if r.path.endswith("/completions")]
        assert models and set(models) == {"b/cheap"}  # only the cheapest BYOK model, ever
        assert len(coord.agents) == 1  # the doctor never authenticated: one provider
        record = next(iter(coord.agents.values()))
        assert record.connections == 1  # and never displaced the agent's session
        assert [a.outcome for a in coord.attempts].count("authenticated") == 1
        assert coord.jobs == {}  # its completions are no jobs
    coord.assert_no_violations()


async def test_a_broken_config_is_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[coordinator]\nurl = 7\n")
    code, out, err = await doctor_cli(cfg)
    assert code == 78 and out == "" and err.startswith("config error:")

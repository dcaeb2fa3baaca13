"""GPU telemetry: NVML sampled in a worker thread under a deadline, `gpus` in the heartbeat.

No GPU here, so NVML is the stand-in in `tests/nvml_stand_in.py` (pynvml's names and exception
classes); the real pynvml is used once, to show that a host without the driver reports nothing.
The end-to-end tests run the agent against the reference coordinator and its contract check.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
import pynvml
import pytest

from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.coordinator.contract import contract_problems
from provider_agent.link.protocol import GpuSample, encode
from provider_agent.observe.telemetry import PACKAGE_MISSING, GpuTelemetry, load_nvml
from tests.agent_harness import agent_where, running_agent, write_config
from tests.link.session_pair import plain_heartbeat
from tests.nvml_stand_in import StandInGpu, StandInNvml, gpu_lost, not_supported

#: Generous: only proves that a hung NVML call is given up on (the stand-in hangs for 60 s).
SHORT_S = 0.3


def telemetry_of(nvml: StandInNvml) -> GpuTelemetry:
    return GpuTelemetry(lambda: nvml, init_timeout_s=SHORT_S, sample_timeout_s=SHORT_S)


@pytest.fixture
def nvml() -> Iterator[StandInNvml]:
    stand_in = StandInNvml(StandInGpu(), StandInGpu(uuid="GPU-2", name=b"NVIDIA L4"))
    yield stand_in
    stand_in.release.set()  # a thread left hanging in a test returns


def beat(gpus: list[GpuSample] | None) -> dict[str, object]:
    """A heartbeat carrying `gpus`, as it goes on the wire (checked against the contract)."""
    frame = plain_heartbeat().model_copy(update={"gpus": gpus})
    assert contract_problems(frame) == []
    data: dict[str, object] = orjson.loads(encode(frame))
    return data


# --- what one sample reports ---------------------------------------------------------------------


async def test_every_field_in_the_contracts_units(nvml: StandInNvml) -> None:
    gpus = await telemetry_of(nvml).sample()
    assert beat(gpus)["gpus"] == [
        {
            "index": 0,
            "uuid": "GPU-5c1e0000-0000-0000-0000-000000000000",
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total_mb": 81559,
            "memory_used_mb": 70211,
            "utilization_pct": 87,
            "temperature_c": 64,
            "power_w": 512.3,
            "healthy": True,
        },
        {
            "index": 1,
            "uuid": "GPU-2",
            "name": "NVIDIA L4",  # older bindings answer bytes
            "memory_total_mb": 81559,
            "memory_used_mb": 70211,
            "utilization_pct": 87,
            "temperature_c": 64,
            "power_w": 512.3,
            "healthy": True,
        },
    ]
    assert nvml.initialised


async def test_memory_is_whole_mib_rounded_down(nvml: StandInNvml) -> None:
    nvml.gpus[0].memory_total = 24 * 2**30 - 1
    nvml.gpus[0].memory_used = 2**20 - 1
    gpus = await telemetry_of(nvml).sample()
    assert gpus is not None
    assert (gpus[0].memory_total_mb, gpus[0].memory_used_mb) == (24 * 1024 - 1, 0)


@pytest.mark.parametrize(
    ("function", "fields"),
    [
        ("nvmlDeviceGetPowerUsage", {"power_w"}),
        ("nvmlDeviceGetTotalEccErrors", set()),
        ("nvmlDeviceGetTemperatureThreshold", set()),
        ("nvmlDeviceGetTemperature", {"temperature_c"}),
        ("nvmlDeviceGetUtilizationRates", {"utilization_pct"}),
        ("nvmlDeviceGetMemoryInfo", {"memory_total_mb", "memory_used_mb"}),
        ("nvmlDeviceGetName", {"name"}),
    ],
)
@pytest.mark.parametrize(
    "error",
    [
        not_supported(),
        pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION),
        pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
    ],
    ids=["not_supported", "no_permission", "function_not_found"],
)
async def test_an_unsupported_query_omits_its_field_and_never_makes_a_gpu_unhealthy(
    nvml: StandInNvml, function: str, fields: set[str], error: pynvml.NVMLError
) -> None:
    nvml.gpus[0].errors[function] = error
    nvml.gpus[0].temperature = 95  # above slowdown, but the threshold may be unknown
    nvml.gpus[0].slowdown = 96
    telemetry = telemetry_of(nvml)
    await telemetry.sample()
    gpus = beat(await telemetry.sample())["gpus"]
    assert isinstance(gpus, list)
    assert gpus[0]["healthy"] is True
    everything = set(gpus[1])
    assert everything - set(gpus[0]) == fields


async def test_temperature_at_the_slowdown_threshold_is_unhealthy(
    nvml: StandInNvml, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = telemetry_of(nvml)
    nvml.gpus[1].temperature = nvml.gpus[1].slowdown = 88
    with caplog.at_level(logging.INFO, "provider_agent.observe.telemetry"):
        gpus = await telemetry.sample()
        assert gpus is not None and [g.healthy for g in gpus] == [True, False]
        assert gpus[1].temperature_c == 88  # the reading is still reported
        nvml.gpus[1].temperature = 87
        gpus = await telemetry.sample()
        assert gpus is not None and [g.healthy for g in gpus] == [True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "GPU 1 unhealthy: temperature 88 C at or above its slowdown 88 C",
        "GPU 1 healthy again",
    ]


async def test_new_uncorrected_ecc_errors_since_the_last_sample_are_unhealthy(
    nvml: StandInNvml,
) -> None:
    nvml.gpus[0].ecc_uncorrected = 4  # errors from before the agent started: a baseline
    telemetry = telemetry_of(nvml)
    healthy = []
    for count in (4, 5, 5, 7):
        nvml.gpus[0].ecc_uncorrected = count
        gpus = await telemetry.sample()
        assert gpus is not None
        healthy.append(gpus[0].healthy)
    assert healthy == [True, False, True, False]


async def test_an_xid_since_the_last_sample_marks_that_gpu_unhealthy(nvml: StandInNvml) -> None:
    telemetry = telemetry_of(nvml)
    await telemetry.sample()
    assert nvml.calls.count("nvmlDeviceRegisterEvents") == 2
    nvml.xids.extend([(1, 79), (1, 48)])
    gpus = await telemetry.sample()
    assert gpus is not None and [g.healthy for g in gpus] == [True, False]
    gpus = await telemetry.sample()
    assert gpus is not None and [g.healthy for g in gpus] == [True, True]


async def test_a_device_query_that_raises_makes_that_gpu_unhealthy(
    nvml: StandInNvml, caplog: pytest.LogCaptureFixture
) -> None:
    nvml.gpus[0].errors["nvmlDeviceGetPowerUsage"] = gpu_lost()
    nvml.gpus[1].errors["nvmlDeviceGetHandleByIndex"] = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    with caplog.at_level(logging.WARNING, "provider_agent.observe.telemetry"):
        gpus = beat(await telemetry_of(nvml).sample())["gpus"]
    assert isinstance(gpus, list)
    assert gpus[0]["healthy"] is False and "power_w" not in gpus[0]
    assert gpus[0]["temperature_c"] == 64  # what still answers is reported
    assert gpus[1] == {"index": 1, "healthy": False}
    assert "GPU 0 unhealthy: power not answering: GPU is lost" in caplog.text
    assert "GPU 1 unhealthy: not answering: Unknown Error" in caplog.text


async def test_no_gpu_reports_an_empty_list(nvml: StandInNvml) -> None:
    nvml.gpus.clear()
    assert beat(await telemetry_of(nvml).sample())["gpus"] == []


# --- no NVML on this host ------------------------------------------------------------------------


async def test_this_hosts_real_nvml_without_a_driver_means_no_gpus_and_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = GpuTelemetry(init_timeout_s=10)
    with caplog.at_level(logging.DEBUG, "provider_agent.observe.telemetry"):
        for _ in range(3):
            assert await telemetry.sample() is None
    if not telemetry.absent:
        pytest.skip("this machine has an NVIDIA driver")
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("no GPU telemetry in heartbeats: NVML unavailable (")
    assert "gpus" not in beat(telemetry.latest)


def test_without_the_driver_pynvml_is_never_imported() -> None:
    """~3 MB of Python an idle agent on a host without NVIDIA's driver does not carry."""
    if not isinstance(load_nvml(), str):
        pytest.skip("this machine has an NVIDIA driver")
    code = (
        "import sys; from provider_agent.observe.telemetry import load_nvml; reason = load_nvml(); "
        "print(reason); print('pynvml' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reason, imported = done.stdout.splitlines()
    assert reason.startswith("NVML unavailable (") and "libnvidia-ml.so.1" in reason
    assert imported == "False"


@pytest.mark.parametrize(
    "error",
    [
        pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
        pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
        pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION),
    ],
)
async def test_nvml_failing_to_start_means_no_gpus_and_nvml_is_not_asked_again(
    error: pynvml.NVMLError, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = StandInNvml(StandInGpu(), init_error=error)
    telemetry = telemetry_of(nvml)
    with caplog.at_level(logging.DEBUG, "provider_agent.observe.telemetry"):
        for _ in range(3):
            assert await telemetry.sample() is None
    assert nvml.calls == ["nvmlInit"]
    assert [r.getMessage() for r in caplog.records] == [
        f"no GPU telemetry in heartbeats: NVML unavailable ({error})"
    ]
    assert "gpus" not in beat(telemetry.latest)


async def test_without_the_package_there_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked = []

    def missing() -> str:
        asked.append(1)
        return PACKAGE_MISSING

    telemetry = GpuTelemetry(missing)
    with caplog.at_level(logging.DEBUG, "provider_agent.observe.telemetry"):
        assert await telemetry.sample() is None
        assert await telemetry.sample() is None
    assert len(asked) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "no GPU telemetry in heartbeats: the nvidia-ml-py package is not installed"
    ]


# --- a driver that hangs or fails as a whole -----------------------------------------------------


async def test_a_hung_sample_is_given_up_and_the_gpus_reported_unhealthy_without_stale_readings(
    nvml: StandInNvml, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = telemetry_of(nvml)
    await telemetry.sample()
    nvml.hang_in = "nvmlDeviceGetCount"
    with caplog.at_level(logging.INFO, "provider_agent.observe.telemetry"):
        with anyio.fail_after(10):  # the budget (SHORT_S) is enforced, the loop not blocked
            gpus = await telemetry.sample()
        assert nvml.hanging.is_set()
        assert beat(gpus)["gpus"] == [
            {
                "index": 0,
                "uuid": "GPU-5c1e0000-0000-0000-0000-000000000000",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_mb": 81559,
                "healthy": False,
            },
            {
                "index": 1,
                "uuid": "GPU-2",
                "name": "NVIDIA L4",
                "memory_total_mb": 81559,
                "healthy": False,
            },
        ]
        calls = len(nvml.calls)
        again = await telemetry.sample()  # still stuck: no second thread into NVML
        assert len(nvml.calls) == calls and again == gpus
        nvml.release.set()
        # the abandoned thread returns in its own time
        assert await anyio.to_thread.run_sync(telemetry._idle.wait, 10)
        gpus = await telemetry.sample()
    assert gpus is not None and [g.healthy for g in gpus] == [True, True]
    assert gpus[0].power_w == 512.3
    assert [r.getMessage() for r in caplog.records] == [
        f"GPUs reported unhealthy: NVML did not answer within {SHORT_S:g}s",
        "NVML answers again",
    ]


async def test_a_hung_init_reports_nothing_and_is_tried_again(nvml: StandInNvml) -> None:
    nvml.hang_in = "nvmlInit"
    telemetry = telemetry_of(nvml)
    with anyio.fail_after(10):
        assert await telemetry.sample() is None
    assert not telemetry.absent
    nvml.release.set()
    assert await anyio.to_thread.run_sync(telemetry._idle.wait, 10)
    gpus = await telemetry.sample()
    assert gpus is not None and len(gpus) == 2


async def test_nvml_failing_as_a_whole_after_a_good_sample(nvml: StandInNvml) -> None:
    telemetry = telemetry_of(nvml)
    await telemetry.sample()
    nvml.count_error = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    gpus = await telemetry.sample()
    assert gpus is not None and [(g.index, g.healthy, g.power_w) for g in gpus] == [
        (0, False, None),
        (1, False, None),
    ]
    nvml.count_error = None
    gpus = await telemetry.sample()
    assert gpus is not None and all(g.healthy for g in gpus)


async def test_a_bug_reading_nvml_is_logged_and_the_heartbeat_has_no_gpus(
    nvml: StandInNvml, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = telemetry_of(nvml)
    await telemetry.sample()
    nvml.count_error = TypeError("not an NVML error")
    with caplog.at_level(logging.WARNING, "provider_agent.observe.telemetry"):
        assert await telemetry.sample() is None
    [record] = caplog.records
    assert record.exc_info is not None and "no gpus in this heartbeat" in record.getMessage()


# --- through the agent and the reference coordinator ---------------------------------------------


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def test_heartbeats_carry_gpus_the_coordinator_accepts(
    coord: DevCoordinator, tmp_path: Path, nvml: StandInNvml
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, heartbeat_interval_s=1)
    async with running_agent(cfg, telemetry=telemetry_of(nvml)):
        agent = await agent_where(
            coord, lambda a: a.last_heartbeat is not None and a.last_heartbeat.gpus
        )
    assert agent.last_heartbeat is not None and agent.last_heartbeat.gpus is not None
    sent = agent.last_heartbeat.gpus
    assert [(g.index, g.uuid, g.memory_total_mb, g.healthy) for g in sent] == [
        (0, "GPU-5c1e0000-0000-0000-0000-000000000000", 81559, True),
        (1, "GPU-2", 81559, True),
    ]
    coord.assert_no_violations()


async def test_heartbeats_stay_on_time_while_nvml_hangs(
    coord: DevCoordinator, tmp_path: Path, nvml: StandInNvml
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, heartbeat_interval_s=1)
    async with running_agent(cfg, telemetry=telemetry_of(nvml)):
        await agent_where(coord, lambda a: a.last_heartbeat is not None and a.last_heartbeat.gpus)
        nvml.hang_in = "nvmlDeviceGetCount"
        agent = await agent_where(
            coord,
            lambda a: (
                a.last_heartbeat is not None
                and a.last_heartbeat.gpus
                and not a.last_heartbeat.gpus[0].healthy
            ),
        )
        stuck_at = agent.heartbeat_count
        # NVML stays stuck: heartbeats keep coming, each one saying so
        agent = await agent_where(coord, lambda a: a.heartbeat_count >= stuck_at + 2)
        assert nvml.hanging.is_set() and not nvml.release.is_set()
        assert agent.last_heartbeat is not None and agent.last_heartbeat.gpus is not None
        assert [g.healthy for g in agent.last_heartbeat.gpus] == [False, False]
        nvml.release.set()
        await agent_where(
            coord,
            lambda a: (
                a.last_heartbeat is not None
                and a.last_heartbeat.gpus
                and all(g.healthy for g in a.last_heartbeat.gpus)
            ),
        )
    coord.assert_no_violations()


async def test_telemetry_off_never_loads_nvml(coord: DevCoordinator, tmp_path: Path) -> None:
    loaded = []

    def load_nvml_counting() -> StandInNvml:
        loaded.append(1)
        return StandInNvml(StandInGpu())

    cfg = write_config(
        tmp_path, coord.ws_url, heartbeat_interval_s=1, extra='[telemetry]\ngpu = "off"\n'
    )
    async with running_agent(cfg, telemetry=GpuTelemetry(load_nvml_counting)):
        agent = await agent_where(coord, lambda a: a.heartbeat_count >= 3)
    assert agent.last_heartbeat is not None and agent.last_heartbeat.gpus is None
    assert not loaded
    coord.assert_no_violations()


def test_a_thread_stuck_in_nvml_does_not_keep_the_process_from_exiting() -> None:
    """The stand-in hangs for 60 s; the process, done with its loop, exits without waiting."""
    script = (
        "import anyio\n"
        "from provider_agent.observe.telemetry import GpuTelemetry\n"
        "from tests.nvml_stand_in import StandInGpu, StandInNvml\n"
        "nvml = StandInNvml(StandInGpu())\n"
        "nvml.hang_in = 'nvmlInit'\n"
        "telemetry = GpuTelemetry(lambda: nvml, init_timeout_s=0.2)\n"
        "assert anyio.run(telemetry.sample) is None and nvml.hanging.is_set()\n"
        "print('sampled')\n"
    )
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "sampled\n"

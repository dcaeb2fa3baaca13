"""GPU telemetry through NVML (NVIDIA's `nvidia-ml-py`, module `pynvml`) for `heartbeat.gpus`
(protocol.md §3).

NVML is a C library in front of the driver, and a wedged driver can hang a call for seconds or for
good. So every NVML call (init included) runs in a worker thread under a deadline, one call at a
time, and the event loop never waits for it: `run()` samples once per heartbeat interval and the
heartbeat reads `latest`, never NVML.

- No NVML (`telemetry.gpu = "off"`, the package missing, libnvidia-ml absent, the driver not
  loaded): one info line, no `gpus` field, nothing else changes.
- A sample that passes its deadline (or that NVML answers with an error for every device): the
  heartbeat still goes out on time and carries the GPUs of the last good sample with only what
  identifies them (index, uuid, name, memory_total_mb) and `healthy: false` — the device stopped
  answering — never stale readings. The stuck thread is abandoned, and no new NVML call starts
  until it returns (a wedged driver costs one thread, not one per heartbeat). It is a daemon
  thread of its own, not one of anyio's pool, which the interpreter waits for at exit: a wedged
  driver must not keep a stopping agent alive.
- A query the device does not support (or that this user may not make) leaves its field out and
  never makes a GPU unhealthy; any other NVML error on a device query does (not answering).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from provider_agent.link.protocol import GpuSample

log = logging.getLogger(__name__)

#: nvmlInit can take several seconds on a host with many GPUs and no persistence daemon.
INIT_TIMEOUT_S = 30.0
#: One sample of every GPU: milliseconds when the driver is well.
SAMPLE_TIMEOUT_S = 5.0
#: XID events read per sample at most (the rest wait for the next one).
MAX_XID_EVENTS = 64
MIB = 2**20

#: The NVML module, as `pynvml` or a stand-in with its names (tests).
Nvml = Any


#: The driver's library, as pynvml loads it on Linux.
NVML_LIBRARY = "libnvidia-ml.so.1"
PACKAGE_MISSING = "the nvidia-ml-py package is not installed"


def load_nvml() -> Nvml | str:
    """`pynvml`, imported only when telemetry is on and NVIDIA's library loads; else why not.
    pynvml is ~3 MB of Python: a host without the driver (a BYOK-only host) never imports it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(NVML_LIBRARY)
        except OSError as exc:
            return f"NVML unavailable ({exc})"
    try:
        import pynvml
    except ImportError:
        return PACKAGE_MISSING
    return pynvml


@dataclass(frozen=True)
class GpuReading:
    """One GPU in one sample, and why it is unhealthy (empty when it is healthy)."""

    sample: GpuSample
    faults: tuple[str, ...] = ()


def _text(value: object) -> str | None:
    """NVML returns bytes from older bindings and str from newer ones."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class NvmlReader:
    """The synchronous side, run only in the worker thread (one call at a time): NVML's state
    between samples (initialised, the XID event set, the ECC counts of the last sample)."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self.initialised = False
        #: The driver's version, read once at init (None when NVML would not say).
        self.driver: str | None = None
        self._events: object | None = None
        self._ecc: dict[str, int] = {}
        self._unsupported = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_NoPermission,
            nvml.NVMLError_FunctionNotFound,
        )

    def read(self) -> list[GpuReading]:
        """Every GPU once. Raises NVMLError when NVML itself fails (init, the device count)."""
        nvml = self.nvml
        if not self.initialised:
            nvml.nvmlInit()
            self.initialised = True
            try:
                self.driver = _text(nvml.nvmlSystemGetDriverVersion())
            except nvml.NVMLError as exc:
                log.debug("no driver version: %s", exc)
            self._events = self._watch_xids()
        xids = self._drain_xids()
        return [self._device(index, xids) for index in range(int(nvml.nvmlDeviceGetCount()))]

    def _watch_xids(self) -> object | None:
        """An event set for XID errors on every device that supports them (None: no device)."""
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.debug("no XID events: %s", exc)
            return None
        watched = 0
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                watched += 1
            except nvml.NVMLError as exc:
                log.debug("no XID events for GPU %d: %s", index, exc)
        return events if watched else None

    def _drain_xids(self) -> dict[int | None, list[int]]:
        """XIDs since the last sample, by GPU index (None: a device NVML could not name)."""
        nvml = self.nvml
        found: dict[int | None, list[int]] = {}
        if self._events is None:
            return found
        for _ in range(MAX_XID_EVENTS):
            try:
                event = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError_Timeout:
                break  # none waiting
            except nvml.NVMLError as exc:
                log.warning("reading GPU XID events failed: %s", exc)
                break
            try:
                index: int | None = int(nvml.nvmlDeviceGetIndex(event.device))
            except nvml.NVMLError:
                index = None
            found.setdefault(index, []).append(int(event.eventData))
        return found

    def _device(self, index: int, xids: dict[int | None, list[int]]) -> GpuReading:
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            return GpuReading(GpuSample(index=index, healthy=False), (f"not answering: {exc}",))
        faults: list[str] = []

        def ask(what: str, query: Callable[..., Any], *args: object) -> Any:
            try:
                return query(handle, *args)
            except self._unsupported:
                return None
            except nvml.NVMLError as exc:
                faults.append(f"{what} not answering: {exc}")
                return None

        uuid = _text(ask("uuid", nvml.nvmlDeviceGetUUID))
        name = _text(ask("name", nvml.nvmlDeviceGetName))
        memory = ask("memory", nvml.nvmlDeviceGetMemoryInfo)
        utilization = ask("utilization", nvml.nvmlDeviceGetUtilizationRates)
        temperature = ask("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        slowdown = ask(
            "slowdown threshold",
            nvml.nvmlDeviceGetTemperatureThreshold,
            nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        )
        power_mw = ask("power", nvml.nvmlDeviceGetPowerUsage)
        ecc = ask(
            "ECC errors",
            nvml.nvmlDeviceGetTotalEccErrors,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if temperature is not None and slowdown is not None and temperature >= slowdown:
            faults.append(f"temperature {temperature} C at or above its slowdown {slowdown} C")
        if ecc is not None:
            key = uuid or str(index)
            before = self._ecc.get(key)
            self._ecc[key] = int(ecc)
            if before is not None and int(ecc) > before:
                faults.append(f"{int(ecc) - before} new uncorrected ECC error(s)")
        faults.extend(f"XID {xid}" for xid in xids.get(index, []) + xids.get(None, []))
        sample = GpuSample(
            index=index,
            healthy=not faults,
            uuid=uuid,
            name=name,
            memory_total_mb=int(memory.total) // MIB if memory is not None else None,
            memory_used_mb=int(memory.used) // MIB if memory is not None else None,
            utilization_pct=int(utilization.gpu) if utilization is not None else None,
            temperature_c=int(temperature) if temperature is not None else None,
            power_w=round(int(power_mw) / 1000, 1) if power_mw is not None else None,
        )
        return GpuReading(sample, tuple(faults))


class GpuTelemetry:
    """The last sample of every GPU (`latest`, None when there is nothing to report), refreshed by
    `run()` in the daemon's task group."""

    def __init__(
        self,
        load: Callable[[], Nvml | str] = load_nvml,
        *,
        init_timeout_s: float = INIT_TIMEOUT_S,
        sample_timeout_s: float = SAMPLE_TIMEOUT_S,
    ) -> None:
        self._load = load
        self.init_timeout_s = init_timeout_s
        self.sample_timeout_s = sample_timeout_s
        self.latest: list[GpuSample] | None = None
        #: Why each GPU of `latest` is unhealthy, by index (a healthy one is not here).
        self.faults: dict[int, tuple[str, ...]] = {}
        #: Why the last sample has no readings (no NVML, a deadline passed); None after a good one.
        self.problem: str | None = None
        #: True once this host turned out to have no NVML: never asked again.
        self.absent = False
        self._reader: NvmlReader | None = None
        self._last_good: list[GpuSample] = []
        #: Cleared while an NVML call runs in a worker thread (including one given up on).
        self._idle = threading.Event()
        self._idle.set()
        self._answering = True
        self._unhealthy: set[int] = set()

    async def run(self, enabled: Callable[[], bool], interval_s: Callable[[], float]) -> None:
        """Sample once per heartbeat interval while `enabled()` (`telemetry.gpu = "auto"`)."""
        while True:
            if enabled():
                await self.sample()
            else:
                self.latest = None
            await anyio.sleep(interval_s())

    async def sample(self) -> list[GpuSample] | None:
        """Take one sample (at most `sample_timeout_s`, `init_timeout_s` the first time) and
        keep it as `latest`."""
        reader = self._reader or self._open()
        if reader is None:
            return None
        if not self._idle.is_set():
            self._not_answering("an earlier NVML call has not returned")
            return self.latest
        timeout = self.sample_timeout_s if reader.initialised else self.init_timeout_s
        self._idle.clear()
        with anyio.move_on_after(timeout):
            try:
                readings = await self._in_nvml_thread(reader)
            except reader.nvml.NVMLError as exc:
                if not reader.initialised:
                    self._give_up(f"NVML unavailable ({exc})")
                else:
                    self._not_answering(f"NVML failed: {exc}")
                return self.latest
            except Exception as exc:
                log.exception("reading GPU telemetry failed; no gpus in this heartbeat")
                self.problem = f"reading GPU telemetry failed ({type(exc).__name__}: {exc})"
                self.latest = None
                self.faults = {}
                return None
            self._keep(readings)
            return self.latest
        self._not_answering(f"NVML did not answer within {timeout:g}s")
        return self.latest

    def _open(self) -> NvmlReader | None:
        if self.absent:
            return None
        nvml = self._load()
        if isinstance(nvml, str):
            self._give_up(nvml)
            return None
        self._reader = NvmlReader(nvml)
        return self._reader

    async def _in_nvml_thread(self, reader: NvmlReader) -> list[GpuReading]:
        """`reader.read()` in a daemon thread; its result or exception comes back here. A caller
        that stops waiting (the deadline, the agent stopping) abandons the thread."""
        token = anyio.lowlevel.current_token()
        returned = anyio.Event()
        outcome: Future[list[GpuReading]] = Future()

        def work() -> None:
            try:
                outcome.set_result(reader.read())
            except BaseException as exc:  # handed to the waiting task, raised there
                outcome.set_exception(exc)
            finally:
                self._idle.set()
                # RunFinishedError/RuntimeError: the agent stopped meanwhile, nobody waits
                with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
                    anyio.from_thread.run_sync(returned.set, token=token)

        threading.Thread(target=work, name="nvml", daemon=True).start()
        await returned.wait()
        return outcome.result()

    @property
    def driver(self) -> str | None:
        """The NVIDIA driver's version, once NVML answered."""
        return self._reader.driver if self._reader is not None else None

    def _give_up(self, why: str) -> None:
        log.info("no GPU telemetry in heartbeats: %s", why)
        self.absent = True
        self.problem = why
        self._reader = None
        self.latest = None
        self.faults = {}

    def _keep(self, readings: Sequence[GpuReading]) -> None:
        if not self._answering:
            log.info("NVML answers again")
            self._answering = True
        for reading in readings:
            index = reading.sample.index
            if reading.faults and index not in self._unhealthy:
                self._unhealthy.add(index)
                log.warning("GPU %d unhealthy: %s", index, "; ".join(reading.faults))
            elif not reading.faults and index in self._unhealthy:
                self._unhealthy.discard(index)
                log.info("GPU %d healthy again", index)
        self.latest = [reading.sample for reading in readings]
        self.faults = {r.sample.index: r.faults for r in readings if r.faults}
        self.problem = None
        self._last_good = self.latest

    def _not_answering(self, why: str) -> None:
        """The GPUs of the last good sample, identified only and unhealthy (none known: no
        `gpus` at all)."""
        if self._answering:
            if self._last_good:
                log.warning("GPUs reported unhealthy: %s", why)
            else:
                log.warning("no GPU telemetry yet: %s", why)
            self._answering = False
        self.problem = why
        self.faults = {gpu.index: (f"not answering: {why}",) for gpu in self._last_good}
        self.latest = [
            GpuSample(
                index=gpu.index,
                healthy=False,
                uuid=gpu.uuid,
                name=gpu.name,
                memory_total_mb=gpu.memory_total_mb,
            )
            for gpu in self._last_good
        ] or None

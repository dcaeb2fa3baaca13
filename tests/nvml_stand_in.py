"""A stand-in for NVML with `pynvml`'s shape, for the one peer that cannot run here (no GPU, no
driver on this machine).

Function names, argument order and return shapes are pynvml's (nvidia-ml-py); the exception
classes and constants are pynvml's own (looked up on the real module), so the agent catches the
same classes it meets on a real host. Each GPU's answers are plain data a test changes between
samples; a query can be made to raise, and one can be made to hang until released.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 2**20


@dataclass
class StandInGpu:
    """One device's answers. `errors` maps a pynvml function name to the error it raises."""

    uuid: str = "GPU-5c1e0000-0000-0000-0000-000000000000"
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    memory_total: int = 81559 * MIB
    memory_used: int = 70211 * MIB
    utilization: int = 87
    temperature: int = 64
    slowdown: int = 90
    power_mw: int = 512345
    ecc_uncorrected: int = 0
    errors: dict[str, pynvml.NVMLError] = field(default_factory=dict)


@dataclass(frozen=True)
class Handle:
    index: int


class StandInNvml:
    """The subset of `pynvml` the agent uses. Every call is recorded in `calls`."""

    def __init__(self, *gpus: StandInGpu, init_error: pynvml.NVMLError | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        #: The next call of this function blocks (in NVML's thread) until `release` is set.
        self.hang_in: str | None = None
        self.hanging = threading.Event()
        self.release = threading.Event()
        #: Raised by nvmlDeviceGetCount (NVML failing as a whole).
        self.count_error: BaseException | None = None
        #: XID events waiting: (device index, xid).
        self.xids: deque[tuple[int, int]] = deque()
        self.calls: list[str] = []
        self.initialised = False
        self.driver = "580.65.06"

    def __getattr__(self, name: str) -> Any:
        """Constants and exception classes: the real module's."""
        return getattr(pynvml, name)

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.hang_in == name:
            self.hang_in = None
            self.hanging.set()
            self.release.wait(timeout=60)

    def _gpu(self, name: str, handle: Handle) -> StandInGpu:
        self._enter(name)
        gpu = self.gpus[handle.index]
        error = gpu.errors.get(name)
        if error is not None:
            raise error
        return gpu

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        if self.count_error is not None:
            raise self.count_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._gpu("nvmlDeviceGetHandleByIndex", Handle(index))
        return Handle(index)

    def nvmlDeviceGetIndex(self, handle: Handle) -> int:
        self._enter("nvmlDeviceGetIndex")
        return handle.index

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: Handle) -> str | bytes:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        free = gpu.memory_total - gpu.memory_used
        return SimpleNamespace(total=gpu.memory_total, used=gpu.memory_used, free=free)

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperature", handle).temperature

    def nvmlDeviceGetTemperatureThreshold(self, handle: Handle, threshold: int) -> int:
        assert threshold == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return self._gpu("nvmlDeviceGetTemperatureThreshold", handle).slowdown

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEccErrors(self, handle: Handle, error_type: int, counter: int) -> int:
        assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        assert counter == pynvml.NVML_VOLATILE_ECC
        return self._gpu("nvmlDeviceGetTotalEccErrors", handle).ecc_uncorrected

    def nvmlEventSetCreate(self) -> object:
        self._enter("nvmlEventSetCreate")
        return self

    def nvmlDeviceRegisterEvents(self, handle: Handle, types: int, events: object) -> None:
        assert types == pynvml.nvmlEventTypeXidCriticalError and events is self
        self._gpu("nvmlDeviceRegisterEvents", handle)

    def nvmlEventSetWait(self, events: object, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait")
        assert events is self and timeout_ms == 0  # never waits
        if not self.xids:
            raise pynvml.NVMLError_Timeout()
        index, xid = self.xids.popleft()
        return SimpleNamespace(
            device=Handle(index), eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid
        )


def not_supported() -> pynvml.NVMLError:
    return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def gpu_lost() -> pynvml.NVMLError:
    return pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

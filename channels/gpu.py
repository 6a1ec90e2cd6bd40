"""GPU readings through NVML (nvidia-ml-py); reports absence plainly where there is no NVML or no GPU."""

from __future__ import annotations

from typing import Any

import pynvml


class GpuProbe:
    """Initialises NVML once; `read()` never raises."""

    def __init__(self) -> None:
        self.reason: str | None = None
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            self.count = 0
            self.reason = f"NVML unavailable: {exc}"
        if self.count == 0 and self.reason is None:
            self.reason = "no NVIDIA GPU found"

    def read(self) -> dict[str, Any]:
        """Utilisation, memory, temperature and power of each GPU, or `available: false` with the reason."""
        if not self.count:
            return {"available": False, "reason": self.reason, "devices": []}
        devices = []
        for i in range(self.count):
            try:
                devices.append(_device(i))
            except pynvml.NVMLError as exc:
                devices.append({"index": i, "error": str(exc)})
        return {"available": True, "devices": devices}


def _device(index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    util = pynvml.nvmlDeviceGetUtilizationRates(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else name,
        "utilization_percent": util.gpu,
        "memory_used_bytes": mem.used,
        "memory_total_bytes": mem.total,
        "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "power_w": round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1),
    }

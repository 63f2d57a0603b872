"""GPU utilisation and memory while a step runs: NVML when importable, else nvidia-smi.

Neither exists on a CPU machine; then the step simply reports no GPU figures.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from typing import Any

import numpy as np


class GpuSampler:
    """Samples device 0 once a second on a thread between ``start`` and ``stop``."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._util: list[float] = []
        self._memory: list[float] = []
        self._per_process: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            # No NVML library or no GPU: nvidia-smi may still answer, else nothing is sampled.
            self._nvml = None
        self.available = self._nvml is not None or shutil.which("nvidia-smi") is not None

    def start(self) -> None:
        if not self.available:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Mean and peak utilisation, peak memory, and memory per process id at the end."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None
            self._sample_processes()
        if not self._util:
            return {}
        result = {
            "utilisation_mean_pct": round(float(np.mean(self._util)), 1),
            "utilisation_max_pct": round(float(np.max(self._util)), 1),
            "memory_peak_mib": round(float(np.max(self._memory))),
            "memory_by_pid_mib": {str(k): round(v) for k, v in self._per_process.items()},
        }
        self._util, self._memory, self._per_process = [], [], {}
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            # A sampler that fails once (driver busy, nvidia-smi slow) must not end the step.
            with contextlib.suppress(Exception):
                self._sample()
            self._stop.wait(self._interval)

    def _sample(self) -> None:
        if self._nvml is not None:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self._util.append(float(rates.gpu))
            self._memory.append(memory.used / 2**20)
            return
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        util, memory = (float(v) for v in out.strip().splitlines()[0].split(","))
        self._util.append(util)
        self._memory.append(memory)

    def _sample_processes(self) -> None:
        try:
            if self._nvml is not None:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    self._per_process[int(proc.pid)] = (proc.usedGpuMemory or 0) / 2**20
                return
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            for line in out.strip().splitlines():
                pid, used = line.split(",")
                self._per_process[int(pid)] = float(used)
        except Exception:
            # Per-process memory is a detail; in containers the pids may not even be ours.
            pass

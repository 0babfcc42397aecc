"""Pick the device and dtype a model runs on: cuda, then mps, then cpu; bf16 on CUDA."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the best one present."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The given dtype, else bf16 on CUDA (fast, range-safe) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower()]
        except KeyError:
            raise ValueError(
                f"unknown dtype {dtype!r}; choose one of: {', '.join(sorted(_DTYPES))}"
            ) from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None: not Linux, or no such field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor id, e.g. "GenuineIntel" or "AuthenticAMD" ("" where unknown)."""
    return _cpuinfo("vendor_id") or ""


def describe_machine(device: str | torch.device) -> dict[str, Any]:
    """What a timing was measured on: the device, the CPU, its cores and torch's threads."""
    device = torch.device(device)
    machine: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def machine_line(machine: dict[str, Any]) -> str:
    """One line for a `describe_machine` record (fields a record lacks show as ?)."""
    where = machine.get("gpu") or machine.get("cpu", "?")
    return (
        f"{machine.get('device', '?')} ({where}), {machine.get('cpu_cores', '?')} cores, "
        f"{machine.get('torch_threads', '?')} torch threads"
    )

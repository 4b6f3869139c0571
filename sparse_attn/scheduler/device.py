"""What the scheduler knows about a device: its kind, generation, parallelism and roofline.

Detected once per device and cached; no kernel launch and no host synchronisation. The peak
rates are nominal constants per device generation: the bench measures the real ones and
`docs/` records them; the scheduler only needs them to rank kernels, not to predict time.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

from .arm_cores import arm_core, cpu_part as _cpu_part


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cpu", "cuda", "npu", or another torch device type
    name: str
    generation: str  # e.g. "sm90", "sm80", "avx512-bf16", "avx2", "neon", "ascend910b"
    units: int  # CPU cores, CUDA SMs, NPU AI cores
    peak_tflops_lowp: float  # bf16/fp16 matrix rate
    peak_tflops_fp32: float
    bandwidth_gbs: float

    def peak_tflops(self, dtype: torch.dtype) -> float:
        if dtype in (torch.float16, torch.bfloat16):
            return self.peak_tflops_lowp
        if dtype == torch.float64:
            return self.peak_tflops_fp32 / 2
        return self.peak_tflops_fp32


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_info() -> DeviceInfo:
    flags = _cpu_flags()
    cores = torch.get_num_threads() or os.cpu_count() or 1
    # GFLOP/s per core of a float32 GEMM; avx512: the bench measured ~95 on this project's machine
    if "avx512_bf16" in flags:
        gen, per_core_fp32 = "avx512-bf16", 96.0
        lowp = per_core_fp32 * 2.2  # bf16 dot products: the bench measured 424 vs 190 GFLOP/s here
    elif "avx512f" in flags:
        gen, per_core_fp32 = "avx512", 96.0
        lowp = per_core_fp32
    elif "avx2" in flags:
        # measured 2026-11-23 on a 2-core Zen 3 EPYC (AVX2, no AVX-512): a 2048^3 float32 GEMM at
        # ~49 GFLOP/s per core-second, the C++ kernels at 46-49; bfloat16 matmuls have no hardware
        # path there (a 1024^3 bf16 GEMM took ~10 s), so low precision is no faster
        gen, per_core_fp32 = "avx2", 48.0
        lowp = per_core_fp32
    elif platform.machine() in ("aarch64", "arm64"):
        core = arm_core(_cpu_part())
        gen = core.name
        per_core_fp32, per_core_gbs = core.fp32_gflops, core.gbs
        # the kernels' bf16 products use bfdot (2 products per lane) where the build has +bf16
        lowp = per_core_fp32 * (2.0 if "bf16" in flags else 1.0)
        return DeviceInfo(type="cpu", name=f"cpu ({platform.machine()}, {cores} threads, {gen}, rates {core.source})",
                          generation=gen, units=cores, peak_tflops_lowp=lowp * cores / 1000,
                          peak_tflops_fp32=per_core_fp32 * cores / 1000,
                          bandwidth_gbs=min(core.socket_gbs, per_core_gbs * cores))
    else:
        gen, per_core_fp32 = "generic", 8.0
        lowp = per_core_fp32
    return DeviceInfo(type="cpu", name=f"cpu ({platform.machine()}, {cores} threads, {gen})", generation=gen,
                      units=cores, peak_tflops_lowp=lowp * cores / 1000, peak_tflops_fp32=per_core_fp32 * cores / 1000,
                      bandwidth_gbs=35.0)


# (bf16 dense TFLOP/s, fp32 non-tensor TFLOP/s, HBM GB/s) per compute capability major.minor
_CUDA_GENERATIONS = {
    (9, 0): (990.0, 67.0, 3350.0),  # H100 SXM
    (8, 9): (180.0, 80.0, 900.0),  # L4/L40/4090 class
    (8, 6): (70.0, 35.0, 900.0),
    (8, 0): (312.0, 19.5, 2000.0),  # A100
    (7, 5): (65.0, 8.0, 320.0),
    (7, 0): (125.0, 15.0, 900.0),
}


def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    lowp, fp32, bw = _CUDA_GENERATIONS.get(cap, _CUDA_GENERATIONS[(8, 0)] if cap >= (8, 0) else (65.0, 8.0, 320.0))
    if "H200" in props.name:
        bw = 4800.0
    if cap >= (10, 0):
        lowp, fp32, bw = 2250.0, 80.0, 8000.0
    return DeviceInfo(type="cuda", name=props.name, generation=f"sm{props.major}{props.minor}",
                      units=props.multi_processor_count, peak_tflops_lowp=lowp, peak_tflops_fp32=fp32,
                      bandwidth_gbs=bw)


def _npu_info(index: int) -> DeviceInfo:
    # torch_npu registers torch.npu; its device name says the Ascend generation (e.g. "Ascend910B2").
    name = "npu"
    cores = 1
    try:
        import torch_npu  # noqa: F401

        name = torch.npu.get_device_name(index)
        props = torch.npu.get_device_properties(index)
        cores = int(getattr(props, "cube_core_num", 0) or getattr(props, "multi_processor_count", 0) or 1)
    except Exception:  # torch_npu missing or too old: keep conservative defaults
        pass
    gen = "ascend910b" if "910B" in name else ("ascend910" if "910" in name else "ascend")
    return DeviceInfo(type="npu", name=name, generation=gen, units=cores, peak_tflops_lowp=300.0,
                      peak_tflops_fp32=75.0, bandwidth_gbs=1600.0)


def check_device(device, name: str = "device") -> torch.device:
    """`device` as a `torch.device`, or `ValueError` naming `name` if it names no device this process
    can allocate on (a bogus string, "cuda" on a CPU build, an index past the device count)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    try:
        probe = torch.empty(0, device=dev)  # the one portable availability check (no data moves)
    except Exception as exc:  # AssertionError (no CUDA build), RuntimeError (bad index), ...
        raise ValueError(f"{name}={device!r} names no available device in this process "
                         f"({type(exc).__name__}: {exc})") from None
    # the device a tensor made there reports: "cuda" becomes "cuda:0" (the current device), so that
    # a cache made with device="cuda" accepts the rows of tensors made with device="cuda" (torch
    # compares cuda:0 != cuda as unequal; the first GPU run failed 29 tests on it)
    return probe.device


@functools.lru_cache(maxsize=None)
def _info(dev_type: str, index: int) -> DeviceInfo:
    if dev_type == "cpu":
        return _cpu_info()
    if dev_type == "cuda":
        return _cuda_info(index)
    if dev_type == "npu":
        return _npu_info(index)
    return DeviceInfo(type=dev_type, name=dev_type, generation=dev_type, units=1, peak_tflops_lowp=10.0,
                      peak_tflops_fp32=5.0, bandwidth_gbs=100.0)


def device_info(device: torch.device) -> DeviceInfo:
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    return _info(device.type, index or 0)

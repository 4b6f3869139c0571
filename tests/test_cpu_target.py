"""The instruction-set target of JIT builds and the Arm cores of the cost model (host-independent:
the aarch64 logic is driven with recorded /proc/cpuinfo contents)."""
from __future__ import annotations

import platform

import pytest

from sparse_attn._build import target
from sparse_attn.scheduler import arm_cores, device

# what qemu-user 10 shows an emulated neoverse-n1 guest (two cores)
N1_CPUINFO = """processor\t: 0
Features\t: fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0c

processor\t: 1
Features\t: fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""
# a big.LITTLE phone: 2 Cortex-X3 and 6 Cortex-A715 cores
PHONE_CPUINFO = "".join(f"processor\t: {i}\nCPU implementer\t: 0x41\nCPU part\t: {'0xd4e' if i < 2 else '0xd4d'}\n\n"
                        for i in range(8))


def test_arm_march_from_features():
    base = {"fp", "asimd", "fphp", "asimdhp", "asimddp"}
    assert target.arm_march(base) == "armv8.2-a+fp16+dotprod"
    assert target.arm_march(base | {"bf16", "i8mm", "sve"}) == "armv8.2-a+fp16+dotprod+bf16"
    assert target.arm_march({"fp", "asimd"}) == "armv8-a"  # Cortex-A72 class: no fp16 / dot products


def test_target_override_and_placeholder(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_CPU_TARGET", "armv8.2-a+fp16+dotprod -mtune=neoverse-n1")
    assert target.target_flags() == ["-march=armv8.2-a+fp16+dotprod", "-mtune=neoverse-n1"]
    assert target.resolve(["-fopenmp", "-march=native"]) == ["-fopenmp", "-march=armv8.2-a+fp16+dotprod",
                                                              "-mtune=neoverse-n1"]
    monkeypatch.delenv("SPARSE_ATTN_CPU_TARGET")
    if platform.machine() in ("x86_64", "AMD64"):
        assert target.resolve(["-march=native"]) == ["-march=native"]


def test_cpu_part_and_cores():
    assert arm_cores.cpu_part(N1_CPUINFO) == (0x41, 0xD0C)
    assert arm_cores.arm_core((0x41, 0xD0C)).name == "neoverse-n1"
    assert arm_cores.cpu_part(PHONE_CPUINFO) == (0x41, 0xD4D)  # the most common core
    assert arm_cores.arm_core((0x61, 0x22)).name == "apple-m"  # any Apple part
    assert arm_cores.arm_core((0x41, 0xFFF)) is arm_cores.UNKNOWN
    assert arm_cores.arm_core(None) is arm_cores.UNKNOWN
    assert arm_cores.cpu_part("no such fields") is None
    # the published rates keep the generations in order
    n1, v1, v2 = (arm_cores.CORES[(0x41, p)] for p in (0xD0C, 0xD40, 0xD4F))
    assert n1.fp32_gflops < v1.fp32_gflops < v2.fp32_gflops
    assert all(c.source == "published, not measured" for c in arm_cores.CORES.values())


@pytest.mark.parametrize("features,lowp_factor", [("fp asimd asimdhp asimddp", 1.0),
                                                  ("fp asimd asimdhp asimddp bf16", 2.0)])
def test_device_info_on_aarch64(monkeypatch, features, lowp_factor):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(device, "_cpu_flags", lambda: set(features.split()))
    monkeypatch.setattr(device, "_cpu_part", lambda: (0x41, 0xD40))
    info = device._cpu_info()
    assert info.generation == "neoverse-v1"
    assert "published" in info.name
    assert info.peak_tflops_lowp == pytest.approx(info.peak_tflops_fp32 * lowp_factor)
    per_core = arm_cores.CORES[(0x41, 0xD40)]
    assert info.bandwidth_gbs == pytest.approx(min(per_core.socket_gbs, per_core.gbs * info.units))

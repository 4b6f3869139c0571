"""Per-core rates of Arm CPU cores for the cost model, by the core's MIDR (implementer, part).

None of these is measured: the project has run nothing on Arm hardware (its Arm tests run under
qemu-user, which says nothing about speed). Each figure is a published number or follows from one:
float32 GFLOP/s per core = FMA pipes x 128-bit lanes (4 floats) x 2 x a typical clock of the
part's best-known product; memory bandwidth per core is a conservative single-core stream figure;
`socket_gbs` the product's DRAM bandwidth. The scheduler only ranks kernels with them (its choices
depend on ratios, which these get right by construction); the bench measures the real rates, and
docs/perf/ is where a measured Arm figure will go. `DeviceInfo.name` says "rates published".
"""
from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class ArmCore:
    name: str
    fp32_gflops: float  # per core
    gbs: float  # per-core stream bandwidth
    socket_gbs: float  # the whole chip's DRAM bandwidth
    source: str = "published, not measured"


def _core(name, pipes, ghz, gbs, socket_gbs):
    return ArmCore(name, pipes * 4 * 2 * ghz, gbs, socket_gbs)


#: (implementer, part) -> core; implementer 0x41 Arm, 0x61 Apple, 0x51 Qualcomm
CORES = {
    (0x41, 0xD0C): _core("neoverse-n1", 2, 2.5, 20.0, 204.0),   # Graviton2, Ampere Altra
    (0x41, 0xD40): _core("neoverse-v1", 4, 2.6, 30.0, 307.0),   # Graviton3 (SVE 2x256 = NEON 4x128)
    (0x41, 0xD49): _core("neoverse-n2", 2, 3.0, 25.0, 300.0),   # Azure Cobalt 100, Yitian 710
    (0x41, 0xD4F): _core("neoverse-v2", 4, 3.1, 40.0, 500.0),   # NVIDIA Grace, Graviton4
    (0x41, 0xD84): _core("neoverse-v3", 4, 3.2, 40.0, 500.0),
    (0x41, 0xD8E): _core("neoverse-n3", 2, 3.2, 25.0, 300.0),
    (0x41, 0xD0B): _core("cortex-a76", 2, 2.4, 10.0, 17.0),     # Raspberry Pi 5
    (0x41, 0xD41): _core("cortex-a78", 2, 3.0, 15.0, 50.0),
    (0x41, 0xD42): _core("cortex-a78ae", 2, 2.2, 15.0, 204.0),  # NVIDIA Orin
    (0x41, 0xD44): _core("cortex-x1", 4, 3.0, 20.0, 50.0),
    (0x41, 0xD47): _core("cortex-a710", 2, 2.8, 15.0, 60.0),
    (0x41, 0xD48): _core("cortex-x2", 4, 3.2, 20.0, 60.0),
    (0x41, 0xD4D): _core("cortex-a715", 2, 2.8, 15.0, 60.0),
    (0x41, 0xD4E): _core("cortex-x3", 4, 3.3, 25.0, 70.0),
    (0x41, 0xD81): _core("cortex-a720", 2, 2.8, 15.0, 70.0),
    (0x41, 0xD82): _core("cortex-x4", 4, 3.3, 25.0, 77.0),
    (0x41, 0xD85): _core("cortex-x925", 6, 3.6, 30.0, 77.0),
    (0x61, None): _core("apple-m", 4, 3.2, 60.0, 100.0),          # Firestorm and later P-cores
    (0x51, 0x001): _core("qualcomm-oryon", 4, 3.8, 40.0, 135.0),  # Snapdragon X
}
#: an aarch64 core not in the table: a modest 2-pipe core
UNKNOWN = _core("aarch64", 2, 2.0, 10.0, 50.0)


def cpu_part(cpuinfo: str | None = None) -> tuple[int, int] | None:
    """The most common (implementer, part) of /proc/cpuinfo's cores (big.LITTLE lists several),
    (0x61, None) on macOS, None when unknown."""
    if cpuinfo is None:
        if platform.system() == "Darwin":
            return (0x61, None)
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    parts, impl = Counter(), None
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        try:
            if key == "cpu implementer":
                impl = int(val.strip(), 0)
            elif key == "cpu part" and impl is not None:
                parts[(impl, int(val.strip(), 0))] += 1
        except ValueError:
            continue
    return parts.most_common(1)[0][0] if parts else None


def arm_core(part: tuple[int, int | None] | None) -> ArmCore:
    if part is None:
        return UNKNOWN
    return CORES.get(part) or CORES.get((part[0], None)) or UNKNOWN

"""The sweep: which cases run, sized for the device and for --quick."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

# Sizes per (device class, quick). `topk_dense` is a length where TopK(16, 64) sees every causal
# key ((16 + 1 sink + 1 local) * 64 = 1152 >= Sk), so the scheduler should route it to dense.
SIZES = {
    ("cpu", True): dict(heads=(8, 2), prefill=(1024, 2048), decode=(1024, 2048), train=(2048,),
                        window=256, linear=4096, topk_dense=1024),
    ("cpu", False): dict(heads=(32, 8), prefill=(1024, 2048, 4096, 8192), decode=(1024, 2048, 4096, 8192),
                         train=(1024, 2048), window=1024, linear=4096, topk_dense=1024),
    ("accel", True): dict(heads=(8, 2), prefill=(16384, 32768), decode=(16384, 32768), train=(4096,),
                          window=1024, linear=16384, topk_dense=1024),
    ("accel", False): dict(heads=(32, 8), prefill=(16384, 32768, 65536, 131072),
                           decode=(16384, 32768, 65536, 131072), train=(4096, 8192, 16384),
                           window=1024, linear=65536, topk_dense=1024),
}
B, D, BLOCK, DENSITY = 1, 128, 64, 0.10


@dataclass(frozen=True)
class Case:
    kind: str                     # "prefill" | "decode" | "train" | "linear"
    label: str                    # pattern label, e.g. "topk16"
    make_pattern: Callable | None  # device -> Pattern (None for linear attention)
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.label}/{SHORT[self.dtype]}/S{self.Sk}"


def random_causal_layout(sk: int, hkv: int, device, density=DENSITY, seed=0) -> torch.Tensor:
    """Bool (1, Hkv, nb, nb): lower-triangular random blocks (about `density` of the causal
    blocks) plus the diagonal, so that every query row sees its own block."""
    nb = math.ceil(sk / BLOCK)
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(1, hkv, nb, nb, generator=g) < density
    lay |= torch.eye(nb, dtype=torch.bool)
    return torch.tril(lay).to(device)


def make_patterns(window: int, hkv: int, sk: int) -> dict:
    """Label -> (device -> pattern) for the softmax patterns of the sweep."""
    import sparse_attn as sa
    return {
        "dense": lambda dev: sa.Dense(),
        f"window{window}": lambda dev: sa.SlidingWindow(window),
        "topk16": lambda dev: sa.TopK(16, block_size=BLOCK),
        "blocksparse10%": lambda dev: sa.BlockSparse(random_causal_layout(sk, hkv, dev), block_size=BLOCK),
    }


def sweep(device: torch.device, quick: bool, dtypes) -> list[Case]:
    """The cases, ordered by kind then length, so that short cases calibrate the time estimates."""
    size = SIZES[("cpu" if device.type == "cpu" else "accel", quick)]
    hq, hkv = size["heads"]
    win = f"window{size['window']}"
    plan = []  # (kind, length, pattern labels)
    for s in sorted(set(size["prefill"]) | {size["topk_dense"]}):
        plan.append(("prefill", s, ["dense", win, "topk16", "blocksparse10%"] if s in size["prefill"] else ["topk16"]))
    plan += [("decode", s, ["dense", "topk16", win]) for s in size["decode"]]
    plan += [("train", s, ["dense", "topk16"]) for s in size["train"]]
    cases = []
    for kind, s, labels in plan:
        made = make_patterns(size["window"], hkv, s)
        for dt in dtypes:
            cases += [Case(kind, label, made[label], B, hq, hkv, 1 if kind == "decode" else s, s, D, dt)
                      for label in labels]
    if torch.float32 in dtypes:
        s = size["linear"]
        cases.append(Case("linear", "linear-retnet", None, B, 8, 8, s, s, D, torch.float32))
    return cases

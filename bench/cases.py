"""The sweep: which cases run, sized for the device and for --quick.

A case is one problem (kind, pattern, shape, dtype); every implementation (bench/impls.py) runs
on it and gives one row. Two sweeps share the cases:

* `length`: each pattern at its default parameter over the context length;
* `sparsity`: at one length, TopK `topk`, SlidingWindow `window` and BlockSparse density varied.

A case in both sweeps runs once (its `sweeps` lists both).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
KINDS = ("prefill", "decode", "train", "linear-prefill", "linear-decode", "linear-step", "window-step",
         "delta-prefill", "delta-train")
#: one decode step against constant-size state (Sq = 1): the linear-attention step at issue 15's shape
#: (B = 1, H = 32, D = Dv = 128, float32 state) and the WindowLinear step over its fixed storage
STEP_KINDS = ("linear-step", "window-step")
LINEAR_STEP_HEADS = (32, 32)
#: delta-rule rows (Gated DeltaNet inputs) at issue 17's shape: B = 1, H = 16 q/k and value heads, D = Dv = 128
DELTA_HEADS = (16, 16)

B, D, BLOCK = 1, 128, 64
K = 1024

# Sizes per (device class, quick). Lengths past what a baseline can do within the per-case budget
# are still listed: the runner skips that implementation with the reason recorded in its row.
SIZES = {
    ("cpu", True): dict(
        heads=(4, 1), prefill=(1 * K, 4 * K), decode=(4 * K, 32 * K), train=(1 * K,),
        sparsity_len=2 * K, topk=(4, 32), window=(128, 512), density=(0.05, 0.2),
        linear_prefill=(4 * K,), linear_decode=(4 * K, 32 * K, 128 * K),
        delta_prefill=(4 * K,), delta_train=(1 * K,),
        default=dict(topk=16, window=256, density=0.10)),
    ("cpu", False): dict(
        heads=(32, 8), prefill=tuple(2**i * K for i in range(0, 8)), decode=tuple(2**i * K for i in range(2, 8)),
        train=(1 * K, 2 * K, 4 * K, 8 * K), sparsity_len=8 * K, topk=(4, 8, 16, 32, 64),
        window=(256, 512, 1024, 2048, 4096), density=(0.025, 0.05, 0.1, 0.2, 0.4),
        linear_prefill=(4 * K, 16 * K, 32 * K), linear_decode=(4 * K, 32 * K, 128 * K),
        # linear-prefill rows in issue 6's shape (float32, B=1, H=8, D=128; its target is S=16384)
        linear_heads=(8, 8),
        delta_prefill=(4 * K, 16 * K), delta_train=(2 * K, 16 * K),
        default=dict(topk=16, window=1024, density=0.10)),
    ("accel", True): dict(
        heads=(32, 8), prefill=(16 * K, 64 * K), decode=(64 * K, 1024 * K), train=(16 * K,),
        sparsity_len=32 * K, topk=(8, 32, 128), window=(1024, 8192), density=(0.05, 0.2),
        linear_prefill=(64 * K,), linear_decode=(4 * K, 32 * K, 128 * K),
        delta_prefill=(16 * K,), delta_train=(16 * K,),
        default=dict(topk=16, window=4096, density=0.10)),
    ("accel", False): dict(
        heads=(32, 8), prefill=tuple(4**i * 4 * K for i in range(0, 5)),  # 4K .. 1M
        decode=tuple(4**i * 4 * K for i in range(0, 5)), train=(4 * K, 16 * K, 64 * K),
        sparsity_len=64 * K, topk=(4, 8, 16, 32, 64, 128), window=(512, 1024, 4096, 8192, 16384),
        density=(0.025, 0.05, 0.1, 0.2, 0.4), linear_prefill=(16 * K, 128 * K), linear_decode=(4 * K, 32 * K, 128 * K),
        delta_prefill=(16 * K, 128 * K), delta_train=(16 * K, 64 * K),
        default=dict(topk=16, window=4096, density=0.10)),
}


@dataclass(frozen=True)
class Case:
    kind: str      # one of KINDS
    family: str    # "dense" | "window" | "topk" | "blocksparse" | "windowlinear" | "linear" | "delta"
    param: float | None  # window, topk or density (None for dense / linear)
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    dtype: torch.dtype
    sweeps: tuple = field(default=("length",), compare=False)

    @property
    def label(self) -> str:
        if self.family == "blocksparse":
            return f"blocksparse{100 * self.param:g}%"
        return self.family + ("" if self.param is None else f"{self.param:g}")

    @property
    def name(self) -> str:
        batch = "" if self.B == B else f"/B{self.B}"  # the sweeps use B = 1; --headline's decode B = 8
        return f"{self.kind}/{self.label}/{SHORT[self.dtype]}/S{self.Sk}{batch}"

    @property
    def softmax(self) -> bool:
        return not self.kind.startswith(("linear", "delta"))

    def make_pattern(self, device):
        """The sparse_attn pattern of this case on `device` (None for linear attention)."""
        import sparse_attn as sa
        f, p = self.family, self.param
        if f == "dense":
            return sa.Dense()
        if f == "window":
            return sa.SlidingWindow(int(p))
        if f == "topk":
            return sa.TopK(int(p), block_size=BLOCK)
        if f == "blocksparse":
            return sa.BlockSparse(random_causal_layout(self.Sk, self.Hkv, device, p), block_size=BLOCK)
        if f == "windowlinear":
            return sa.WindowLinear(int(p))
        return None

    def density(self, pattern=None) -> float:
        """Visited (query, key) pairs of the pattern / pairs of dense causal attention."""
        from sparse_attn.patterns.base import causal_pairs
        if pattern is None:
            return 1.0
        return pattern.visited_pairs(self.Sq, self.Sk) / max(causal_pairs(self.Sq, self.Sk), 1.0)


def host_pattern(pattern):
    """The pattern with a BlockSparse layout copied to the CPU, so that its density (visited pairs)
    is read on the host (sparse_attn reads it only from CPU layouts, to never synchronise)."""
    import sparse_attn as sa
    if isinstance(pattern, sa.BlockSparse) and pattern.layout.device.type != "cpu":
        return sa.BlockSparse(pattern.layout.cpu(), block_size=pattern.block_size)
    return pattern


def random_causal_layout(sk: int, hkv: int, device, density: float, seed: int = 0) -> torch.Tensor:
    """Bool (1, Hkv or 1, nb, nb): lower-triangular random blocks, about `density` of the causal
    blocks, plus the diagonal (every query row sees its own block). One layout shared by the kv
    heads past 4096 blocks (256K tokens), built in row chunks to keep the memory small."""
    nb = math.ceil(sk / BLOCK)
    h = hkv if nb <= 4096 else 1
    g = torch.Generator().manual_seed(seed)
    lay = torch.empty(1, h, nb, nb, dtype=torch.bool)
    cols = torch.arange(nb)
    for r0 in range(0, nb, 1024):
        rows = torch.arange(r0, min(nb, r0 + 1024))
        chunk = torch.rand(1, h, len(rows), nb, generator=g) < density
        chunk |= rows[:, None] == cols[None, :]
        chunk &= cols[None, :] <= rows[:, None]
        lay[:, :, r0:r0 + len(rows)] = chunk
    return lay.to(device)


def sweep(device: torch.device, quick: bool, dtypes) -> list[Case]:
    """The cases, ordered by kind then length, so that short cases calibrate the time estimates
    of the longer ones."""
    size = SIZES[("cpu" if device.type == "cpu" else "accel", quick)]
    hq, hkv = size["heads"]
    dflt = size["default"]
    length_fams = [("dense", None), ("window", dflt["window"]), ("topk", dflt["topk"]),
                   ("blocksparse", dflt["density"]), ("windowlinear", dflt["window"])]
    cases: dict[str, Case] = {}

    def add(kind, fam, param, s, dt, sweep_name, heads=(hq, hkv)):
        sq = 1 if kind in ("decode", "linear-decode") + STEP_KINDS else s
        c = Case(kind, fam, param, B, heads[0], heads[1], sq, s, D, dt, (sweep_name,))
        old = cases.get(c.name)
        if old is None:
            cases[c.name] = c
        elif sweep_name not in old.sweeps:
            cases[c.name] = dataclasses.replace(old, sweeps=old.sweeps + (sweep_name,))

    for dt in dtypes:
        for s in size["prefill"]:
            for fam, p in length_fams:
                add("prefill", fam, p, s, dt, "length")
        sl = size["sparsity_len"]
        for fam, key in (("topk", "topk"), ("window", "window"), ("blocksparse", "density")):
            for p in sorted(set(size[key]) | (set() if quick else {dflt[key]})):
                add("prefill", fam, p, sl, dt, "sparsity")
        for s in size["decode"]:
            for fam, p in length_fams:
                add("decode", fam, p, s, dt, "length")
        for s in size["train"]:
            for fam, p in length_fams:
                add("train", fam, p, s, dt, "length")
    ldt = torch.float32 if torch.float32 in dtypes else dtypes[0]
    for s in size["linear_prefill"]:
        add("linear-prefill", "linear", None, s, ldt, "length", heads=size.get("linear_heads", (hq, hkv)))
    for s in size["linear_decode"]:
        add("linear-decode", "linear", None, s, ldt, "length")
    add("linear-step", "linear", None, 1, ldt, "length", heads=LINEAR_STEP_HEADS)
    add("window-step", "windowlinear", dflt["window"], 4 * dflt["window"], ldt, "length")
    for kind in ("delta-prefill", "delta-train"):
        for s in size.get(kind.replace("-", "_"), ()):
            add(kind, "delta", None, s, ldt, "length", heads=DELTA_HEADS)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(cases.values(), key=lambda c: (order[c.kind], c.Sk, c.dtype != dtypes[0]))

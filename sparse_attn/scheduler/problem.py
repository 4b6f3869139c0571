"""`Problem`: one frozen description of an attention call, validated once.

Every kernel answers "why not" and "how much" from a `Problem` alone, so nothing here may need a
host synchronisation: shapes, dtypes, the device, the phase and the pattern's parameters.
Validation raises the contract's `ValueError` / `TypeError` naming the argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..patterns import BlockSparse, Dense, Pattern, SlidingWindow, TopK, WindowLinear
from .device import DeviceInfo, device_info

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("reference", "triton", "cpu", "cuda", "npu")

PREFILL, DECODE, CHUNKED, TRAINING = "prefill", "decode", "chunked-prefill", "training"


@dataclass(frozen=True)
class Problem:
    batch: int
    q_heads: int
    kv_heads: int
    sq: int
    sk: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    device: DeviceInfo
    pattern: Pattern
    scale: float
    requires_grad: bool
    varlen: bool = False
    #: the torch device of the inputs (None: not recorded); a plan refuses inputs on another one
    torch_device: torch.device | None = None
    #: logit soft-capping: scores become `softcap * tanh(s / softcap)` (None: off)
    softcap: float | None = None
    #: whether a `(Hq,)` tensor of learned sink logits joins each row's softmax denominator
    sinks: bool = False
    #: the caller's pattern where `pattern` is an equal one that runs faster (a TopK, InfLLMv2 or
    #: window that sees every causal key at these lengths runs as `Dense()`); None: the caller's
    requested: Pattern | None = None

    @property
    def group(self) -> int:
        return max(1, self.q_heads // self.kv_heads) if self.kv_heads else 1  # zero heads: an empty problem

    @property
    def phase(self) -> str:
        if self.requires_grad:
            return TRAINING
        if self.sq == 1:
            return DECODE
        return PREFILL if self.sq == self.sk else CHUNKED

    @property
    def is_empty(self) -> bool:
        return self.batch == 0 or self.sq == 0 or self.q_heads == 0

    def visited_pairs(self) -> float:
        """Visible (query, key) pairs over all batches and query heads (host estimate)."""
        return self.pattern.visited_pairs(self.sq, self.sk) * self.batch * self.q_heads

    def flops(self) -> float:
        """Forward FLOPs over the visited pairs (two matrix products); backward is ~2.5x."""
        f = 2.0 * (self.head_dim + self.v_head_dim) * self.visited_pairs()
        return f * 3.5 if self.requires_grad else f

    def check_inputs(self, q, k, v, *, gate=None, sink_logits=None) -> None:
        """Raise `ValueError` unless `q`, `k`, `v` (and `gate`) are the problem this describes: a plan
        runs only the call it was made for (its kernel choice and scale depend on it)."""
        check_qkv(q, k, v)
        got = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
        want = (self.batch, self.q_heads, self.kv_heads, self.sq, self.sk, self.head_dim, self.v_head_dim)
        if got != want:  # (tuples: this runs on every call of a kept plan)
            diff = ", ".join(f"{n}={g} (planned {w})" for n, g, w in zip(("B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv"),
                                                                        got, want) if g != w)
            raise ValueError(f"q, k, v do not match the problem this plan was made for: {diff}; make a new plan")
        if q.dtype != self.dtype:
            raise ValueError(f"q, k, v have dtype {q.dtype} but this plan was made for {self.dtype}; make a new plan")
        if (self.torch_device is not None and q.device != self.torch_device) or q.device.type != self.device.type:
            raise ValueError(f"q, k, v are on {q.device} but this plan was made for "
                             f"{self.torch_device or self.device.type}; make a new plan")
        if (gate is not None) != isinstance(self.pattern, WindowLinear):
            raise ValueError("gate must be given exactly when the plan's pattern is WindowLinear")
        if (sink_logits is not None) != self.sinks:
            raise ValueError("sink_logits must be given exactly when the plan was made with sink_logits")
        if sink_logits is not None:
            check_sinks(sink_logits, q_heads=self.q_heads, device=q.device)
        if not self.requires_grad and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (q, k, v, gate, sink_logits)):
            raise ValueError("the inputs require grad but this plan was made for inference (requires_grad=False); "
                             "make the plan with requires_grad=True")

    def check_out(self, out, q, k, v, *, gate=None, sink_logits=None) -> None:
        """Raise unless `out` can receive this problem's result (`Plan.run(out=)`): a tensor of
        shape `(B, Hq, Sq, Dv)`, q's dtype and device, sharing no memory with the inputs, no element
        reached twice (no stride-0 dim), and an inference call (autograd does not track a result
        written into `out`)."""
        _need_tensor("out", out)
        want = (self.batch, self.q_heads, self.sq, self.v_head_dim)
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape (B, Hq, Sq, Dv) = {want}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"out must have q's dtype {q.dtype}, got {out.dtype}")
        if out.device != q.device:
            raise ValueError(f"out must be on q's device {q.device}, got {out.device}")
        if torch.is_grad_enabled() and (out.requires_grad or any(
                t is not None and t.requires_grad for t in (q, k, v, gate, sink_logits))):
            raise ValueError("out= is for inference: the inputs (or out) require grad; call run() without out")
        if any(n > 1 and st == 0 for n, st in zip(out.shape, out.stride())):
            raise ValueError(f"out must not have a stride-0 dim (an expanded view writes one element for many "
                             f"positions), got strides {tuple(out.stride())}")
        mem = out.untyped_storage().data_ptr()
        for name, t in (("q", q), ("k", k), ("v", v), ("gate", gate)):
            if t is not None and t.untyped_storage().data_ptr() == mem and _overlap(out, t):
                raise ValueError(f"out must not share memory with {name}")

    def describe(self) -> str:
        extra = (", learned sinks" if self.sinks else "") + (f", softcap={self.softcap:g}" if self.softcap else "")
        return (f"B={self.batch} Hq={self.q_heads} Hkv={self.kv_heads} Sq={self.sq} Sk={self.sk} "
                f"D={self.head_dim} Dv={self.v_head_dim} {str(self.dtype).replace('torch.', '')} "
                f"on {self.device.name}, {self.phase}, {self.pattern.describe()}{extra}"
                + (f" ({self.requested.describe()} sees every causal key at Sk={self.sk}: run as "
                   f"{self.pattern.describe()})" if self.requested is not None else ""))


def effective_pattern(pattern: Pattern, sk: int) -> tuple[Pattern, Pattern | None]:
    """`(pattern a kernel runs, the caller's pattern or None)`: `pattern.clamped(sk)` (integers
    beyond the sequence mean what its length means), and a TopK whose every query selects all its
    causal blocks, or a window longer than the keys, IS dense causal attention (contract: "a short
    sequence degrades exactly to dense causal attention"), so it runs as `Dense()`: no selection,
    no per-token block lists, no window rule (InfLLMv2's `clamped` does the same). `sk` is the
    longest sequence's keys; shorter ones see every causal key too."""
    run = pattern.clamped(sk)
    if isinstance(run, (TopK, SlidingWindow)) and run.is_dense_causal_for(sk, sk):
        run = Dense()
    return run, (pattern if isinstance(run, Dense) and not isinstance(pattern, Dense) else None)


def dense_reach(pattern: Pattern, *, limit: int = 1 << 40) -> int | None:
    """The longest `sk` at which `effective_pattern(pattern, sk)` runs `Dense()` (0: none; None: every
    length up to `limit`, e.g. `Dense` itself). A decode loop whose sequences all stay within it may
    run the pattern as Dense with no per-step pattern check (`CpuCacheDecode.prepared`: a TopK's
    Dense re-run bounded by this). Found by bisection on the patterns' own rule, which covers every
    length below one that it covers (a longer sequence only adds candidate blocks / hidden keys)."""
    def dense(n):
        return isinstance(effective_pattern(pattern, n)[0], Dense)
    if dense(limit):
        return None
    lo, hi = 0, limit  # dense(lo) or lo == 0; not dense(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dense(mid) else (lo, mid)
    return lo if lo > 0 and dense(lo) else 0


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of `a` and `b` intersect (host pointers and strides only)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr()
        return lo, lo + (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _need_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_backend(backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_softcap(softcap) -> float | None:
    """`softcap`: None, or a finite float > 0 (returned as a float)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float > 0 or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a finite float > 0, got {softcap}")
    return float(softcap)


def check_sinks(sink_logits, *, q_heads: int, device) -> None:
    """`sink_logits`: None, or a floating-point `(Hq,)` tensor on q's device."""
    if sink_logits is None:
        return
    _need_tensor("sink_logits", sink_logits)
    if not sink_logits.is_floating_point():
        raise TypeError(f"sink_logits must be a floating-point tensor, got {sink_logits.dtype}")
    if tuple(sink_logits.shape) != (q_heads,):
        raise ValueError(f"sink_logits must have shape (Hq,) = ({q_heads},), got {tuple(sink_logits.shape)}")
    if sink_logits.device != device:
        raise ValueError(f"sink_logits is on {sink_logits.device} but q is on {device}")


def check_softmax_options(pattern, sink_logits, softcap, *, q_heads: int, device) -> float | None:
    """The two options of softmax patterns (contract, "Learned sinks and logit soft-capping").
    Returns the validated softcap."""
    cap = check_softcap(softcap)
    check_sinks(sink_logits, q_heads=q_heads, device=device)
    if isinstance(pattern, WindowLinear) and (cap is not None or sink_logits is not None):
        what = "sink_logits" if sink_logits is not None else "softcap"
        raise ValueError(f"{what} applies to the softmax patterns (Dense, SlidingWindow, BlockSparse, TopK), "
                         f"not to WindowLinear")
    return cap


def check_qkv(q, k, v, *, ndim: int = 4, names=("q", "k", "v")) -> None:
    """Types, ranks, dtypes and devices common to every op. `ndim` 4 = (B,H,S,D), 3 = varlen."""
    for name, x in zip(names, (q, k, v)):
        _need_tensor(name, x)
        if x.dim() != ndim:
            want = "(B, H, S, D)" if ndim == 4 else "(T, H, D)"
            raise ValueError(f"{name} must be {ndim}-D {want}, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    h = 1  # head axis in both layouts
    s = 2 if ndim == 4 else 0
    if ndim == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[h] != v.shape[h]:
        raise ValueError(f"k and v must have the same number of heads, got k={k.shape[h]}, v={v.shape[h]}")
    if k.shape[s] != v.shape[s]:
        raise ValueError(f"k and v must have the same sequence length, got k={k.shape[s]}, v={v.shape[s]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got q={q.shape[-1]}, k={k.shape[-1]}")
    if k.shape[h] == 0 and q.shape[h] != 0:
        raise ValueError("k must have at least one head")
    if k.shape[h] and q.shape[h] % k.shape[h] != 0:
        raise ValueError(f"the number of query heads ({q.shape[h]}) must be a multiple of the number of "
                         f"kv heads ({k.shape[h]}) (GQA: q head h reads kv head h // (Hq // Hkv))")


def check_pattern(pattern, *, q_heads, kv_heads, batch, sq, sk, gate, device) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK, WindowLinear; "
                        f"got {type(pattern).__name__}")
    if pattern.causal and sq > sk:
        raise ValueError(f"queries are aligned to the end of the keys, so a causal pattern needs Sq <= Sk; "
                         f"got q length {sq} > k length {sk}")
    if isinstance(pattern, BlockSparse):
        lay = pattern.layout
        nb = -(-sk // pattern.block_size)
        if lay.shape[0] not in (1, batch) or lay.shape[1] not in (1, kv_heads) or lay.shape[2] != nb \
                or lay.shape[3] != nb:
            raise ValueError(f"BlockSparse.layout must have shape (B or 1, Hkv or 1, ceil(Sk/bs), ceil(Sk/bs)) "
                             f"= ({batch} or 1, {kv_heads} or 1, {nb}, {nb}), got {tuple(lay.shape)}")
        if lay.device != device:
            raise ValueError(f"BlockSparse.layout is on {lay.device} but q is on {device}")
    if isinstance(pattern, WindowLinear):
        if gate is None:
            raise ValueError("WindowLinear needs gate=: a (Hq,) tensor of per-head gate logits")
    if gate is not None:
        if not isinstance(pattern, WindowLinear):
            raise ValueError(f"gate is only used by WindowLinear, not by {type(pattern).__name__}")
        _need_tensor("gate", gate)
        if gate.shape != (q_heads,):
            raise ValueError(f"gate must have shape (Hq,) = ({q_heads},), got {tuple(gate.shape)}")
        if not gate.is_floating_point():
            raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
        if gate.device != device:
            raise ValueError(f"gate is on {gate.device} but q is on {device}")


def make_problem(q, k, v, pattern, *, scale=None, gate=None, requires_grad=None, sink_logits=None,
                 softcap=None) -> Problem:
    """Validate an `attention(q, k, v, pattern, ...)` call and describe it."""
    check_qkv(q, k, v)
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    check_pattern(pattern, q_heads=hq, kv_heads=hkv, batch=b, sq=sq, sk=sk, gate=gate, device=q.device)
    scale = check_scale(scale, d)
    softcap = check_softmax_options(pattern, sink_logits, softcap, q_heads=hq, device=q.device)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, gate, sink_logits))
    # integers beyond the sequence mean what the sequence's length means (contract): kernels never
    # see (nor allocate by) a parameter's face value
    run, requested = effective_pattern(pattern, sk)
    return Problem(batch=b, q_heads=hq, kv_heads=hkv, sq=sq, sk=sk, head_dim=d, v_head_dim=dv, dtype=q.dtype,
                   device=device_info(q.device), pattern=run, scale=scale,
                   requires_grad=bool(requires_grad), torch_device=q.device, softcap=softcap,
                   sinks=sink_logits is not None, requested=requested)

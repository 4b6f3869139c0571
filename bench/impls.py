"""The implementations each case runs: sparse_attn (the scheduler's choice, then every registered
backend by name), PyTorch SDPA per backend, FlexAttention, and flash-attn / FlashInfer / fla when
they are importable (never installed by the bench).

An implementation's `build(x)` returns a `Built` (the kernel's name and a zero-argument callable
that runs the case once, forward plus backward for training) or raises `Unsupported(reason)`.
Nothing here is hard-coded to a kernel: the sparse_attn backends are read from the registry at run
time, so kernels added later show up by themselves.
"""
from __future__ import annotations

import importlib
import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    """This implementation cannot run this case; the message says why (recorded in the row)."""


@dataclass
class Inputs:
    """Everything one case hands to the implementations (built once per case by the runner)."""
    case: object
    device: torch.device
    pattern: object        # sparse_attn pattern, None for linear attention
    q: torch.Tensor        # (B, Hq, Sq, D)
    k: torch.Tensor        # (B, Hkv, Sk, D)
    v: torch.Tensor
    gate: torch.Tensor | None = None       # WindowLinear gate logits (Hq,)
    decay: torch.Tensor | None = None      # linear attention per-head log-decays (Hq,); delta rule (B, Hq, S)
    beta: torch.Tensor | None = None       # delta rule write strengths (B, Hq, S)
    state: torch.Tensor | None = None      # linear decode: state after Sk - 1 tokens (B, Hq, D, D)
    states: list | None = None             # linear-step: equal copies of `state`, stepped in turn (one per layer)
    grad: torch.Tensor | None = None       # training: gradient of the output
    host_pattern: object = None            # the pattern with its BlockSparse layout on the CPU (work counts)


@dataclass
class Built:
    kernel: str
    fn: Callable
    prep_s: float = 0.0   # host-side preparation done once (e.g. FlexAttention's block mask)
    check: Callable | None = None  # stateful `fn` (a decode step): gives the output to check against the reference


class Impl:
    name = "?"
    group = "?"             # "sparse_attn" | "sdpa" | "flex" | "external"
    computes = "pattern"    # "pattern": the case's pattern; "dense": dense causal attention
    compiles = False        # the first call compiles (its time is kept apart from the timing)

    def cache_key(self, case):
        """Rows with equal keys are the same call: measured once per run (dense baselines)."""
        return None

    def build(self, x: Inputs) -> Built:
        raise NotImplementedError


def _train_step(f, x: Inputs):
    """Forward + backward of `f(q, k, v)`; returns the detached forward output."""
    def step():
        for t in (x.q, x.k, x.v, x.beta, x.decay):
            if t is not None:
                t.grad = None
        out = f(x.q, x.k, x.v)
        out.backward(x.grad)
        return out.detach()
    return step


def _wrap(f, x: Inputs):
    if x.case.kind in ("train", "delta-train"):
        return _train_step(f, x)
    return lambda: f(x.q, x.k, x.v)


def _short_reasons(err: Exception, backend: str | None) -> str:
    """The scheduler's 'no kernel can run' message, on one line."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    return "; ".join(lines)[:300] or str(err).splitlines()[0]


# ------------------------------------------------------------------------------- sparse_attn
class SparseAttn(Impl):
    group = "sparse_attn"

    def __init__(self, backend: str | None):
        self.backend = backend
        self.name = "sparse_attn" if backend is None else f"sparse_attn[{backend}]"

    def build(self, x: Inputs) -> Built:
        import sparse_attn as sa
        case = x.case
        if case.family == "delta":
            return self._build_delta(x)
        if not case.softmax:
            return self._build_linear(x)
        if case.kind == "window-step":
            return self._build_window_step(x)
        try:
            p = sa.plan(x.q, x.k, x.v, x.pattern, gate=x.gate, backend=self.backend)
        except ValueError as e:
            raise Unsupported(_short_reasons(e, self.backend)) from None
        pat, gate, backend = x.pattern, x.gate, self.backend
        return Built(p.kernel.name, _wrap(lambda a, b, c: sa.attention(a, b, c, pat, gate=gate, backend=backend), x))

    def _build_linear(self, x: Inputs) -> Built:
        import sparse_attn as sa
        kernel = linear_kernel_name(x, self.backend)
        decay, backend = x.decay, self.backend
        if x.case.kind == "linear-decode":  # one new token on top of the state of the Sk - 1 before it
            q, k, v, st = x.q, x.k[:, :, -1:], x.v[:, :, -1:], x.state
            return Built(kernel, lambda: sa.linear_attention(q, k, v, decay=decay, initial_state=st,
                                                             return_state=True, backend=backend)[0])
        if x.case.kind == "linear-step":  # the same step on each layer's state in turn (equal states: same output)
            q, k, v, layers = x.q, x.k[:, :, -1:], x.v[:, :, -1:], itertools.cycle(x.states)
            return Built(kernel, lambda: sa.linear_attention(q, k, v, decay=decay, initial_state=next(layers),
                                                             return_state=True, backend=backend)[0])
        return Built(kernel, _wrap(lambda a, b, c: sa.linear_attention(a, b, c, decay=decay, backend=backend), x))


    def _build_delta(self, x: Inputs) -> Built:
        """`delta_rule` on Gated DeltaNet inputs (qk_l2norm), forward or forward + backward."""
        import sparse_attn as sa
        beta, g, backend = x.beta, x.decay, self.backend
        try:
            p = sa.plan_delta_rule(x.q, x.k, x.v, beta, decay=g, qk_l2norm=True, backend=backend,
                                   requires_grad=x.case.kind == "delta-train")
        except ValueError as e:
            raise Unsupported(_short_reasons(e, backend)) from None
        return Built(p.kernel.name, _wrap(lambda a, b, c: sa.delta_rule(a, b, c, beta, decay=g, qk_l2norm=True,
                                                                         backend=backend), x))

    def _build_window_step(self, x: Inputs) -> Built:
        """A WindowLinear decoder after a prefill of the first Sk - 1 tokens, stepped with the last one
        (every timed call is one more step: the storage has a fixed size, so each costs the same)."""
        from sparse_attn.api.window_linear import WindowLinearDecoder
        kp, vp, kn, vn, q = x.k[:, :, :-1], x.v[:, :, :-1], x.k[:, :, -1:], x.v[:, :, -1:], x.q

        def fresh():
            return WindowLinearDecoder.from_prefill(kp, vp, x.pattern, gate=x.gate, backend=self.backend)
        dec = fresh()
        try:
            p = dec.plan_step(q, kn, vn)
        except ValueError as e:
            raise Unsupported(_short_reasons(e, self.backend)) from None
        return Built(p.kernel.name, lambda: dec.step(q, kn, vn), check=lambda: fresh().step(q, kn, vn))


def linear_kernel_name(x: Inputs, backend: str | None) -> str:
    """The linear_attention kernel the scheduler picks (asked the way the public op asks)."""
    from sparse_attn.patterns.linear import LinearAttention
    from sparse_attn.scheduler.device import device_info
    from sparse_attn.scheduler.plan import choose
    from sparse_attn.scheduler.problem import Problem
    b, h, s, d = x.q.shape
    sq = 1 if x.case.kind in ("linear-decode", "linear-step") else s
    try:
        problem = Problem(batch=b, q_heads=h, kv_heads=x.k.shape[1], sq=sq, sk=sq, head_dim=d,
                          v_head_dim=x.v.shape[3], dtype=x.q.dtype, device=device_info(x.q.device),
                          pattern=LinearAttention("per-head"), scale=d ** -0.5,
                          requires_grad=x.case.kind == "train")
        return choose(problem, backend=backend, op="linear_attention").kernel.name
    except ValueError as e:
        raise Unsupported(_short_reasons(e, backend)) from None
    except Exception:  # the scheduler's internals moved: the run still works, the name is unknown
        return "(linear_attention)"


def sparse_attn_impls() -> list[Impl]:
    """The scheduler's choice, then each backend that has a registered kernel (read at run time)."""
    from sparse_attn.scheduler.registry import kernels
    backends = []
    for op in ("attention", "linear_attention", "delta_rule"):
        for kern in kernels(op):
            if kern.backend not in backends:
                backends.append(kern.backend)
    return [SparseAttn(None)] + [SparseAttn(b) for b in backends]


# -------------------------------------------------------------------------------------- SDPA
def _mem_available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


_SDPA_PROBE: dict = {}


def probe_sdpa(backend, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if SDPA's `backend` runs a small causal GQA call on this device and dtype, else why not."""
    from torch.nn.attention import sdpa_kernel
    key = (backend, device.type, dtype)
    if key not in _SDPA_PROBE:
        try:
            q = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
            k = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            _SDPA_PROBE[key] = None
        except Exception as e:
            _SDPA_PROBE[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return _SDPA_PROBE[key]


class Sdpa(Impl):
    """torch SDPA forced onto one backend, computing DENSE causal attention: the baseline that a
    sparse pattern replaces (a single decode query sees every key)."""
    group = "sdpa"
    computes = "dense"

    def __init__(self, backend):
        self.backend = backend
        self.name = "sdpa." + backend.name.lower().removesuffix("_attention")

    def cache_key(self, case):
        return (self.name, case.kind.removeprefix("linear-"), case.B, case.Hq, case.Hkv, case.Sq, case.Sk,
                case.D, case.dtype)

    def build(self, x: Inputs) -> Built:
        from torch.nn.attention import sdpa_kernel
        case = x.case
        if case.kind in ("linear-step", "window-step"):
            raise Unsupported("a decode step against constant-size state has no SDPA counterpart")
        why = probe_sdpa(self.backend, x.device, case.dtype)
        if why:
            raise Unsupported(f"not available on {x.device.type}/{str(case.dtype).removeprefix('torch.')}: {why}")
        if self.backend.name == "MATH":  # materialises the (Sq, Sk) scores, in float32, per head
            need = case.B * case.Hq * case.Sq * case.Sk * 4 * (3 if case.kind == "train" else 2)
            avail = _mem_available_bytes(x.device)
            if need > 0.5 * avail:
                raise Unsupported(f"math backend would hold {need / 1e9:.1f} GB of scores "
                                  f"(half the available memory is {avail / 2e9:.1f} GB)")
        causal, gqa, backend = case.Sq > 1, case.Hq != case.Hkv, self.backend

        def f(a, b, c):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=gqa)
        if case.kind == "linear-decode":
            return Built("dense softmax decode", lambda: f(x.q, x.k, x.v))
        return Built("dense causal", _wrap(f, x))


def sdpa_impls() -> list[Impl]:
    from torch.nn.attention import SDPBackend
    names = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    return [Sdpa(getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


# ----------------------------------------------------------------------------- FlexAttention
_FLEX_COMPILED = None
FLEX_MASK_LIMIT = 1 << 30  # bytes: create_block_mask evaluates the mask over (heads x) Sq x Sk


def _flex_mask_mod(x: Inputs):
    """(mask_mod, per_head) for the case's pattern, from the same pattern objects sparse_attn uses."""
    import sparse_attn as sa
    case, pat = x.case, x.pattern
    off, G = case.Sk - case.Sq, case.Hq // case.Hkv
    if isinstance(pat, sa.Dense):
        return (lambda b, h, qi, ki: ki <= qi + off), False
    if isinstance(pat, sa.SlidingWindow):
        w, sinks = pat.window, pat.sinks
        return (lambda b, h, qi, ki: (ki <= qi + off) & ((qi + off - ki < w) | (ki < sinks))), False
    if isinstance(pat, sa.BlockSparse):
        lay, bs = pat.layout, pat.block_size
        lay = lay.expand(case.B, case.Hkv, lay.shape[2], lay.shape[3])
        return (lambda b, h, qi, ki: (ki <= qi + off) & lay[b, h // G, (qi + off) // bs, ki // bs]), True
    if isinstance(pat, sa.TopK):
        sel = sa.select_blocks(x.q.detach(), x.k.detach(), pat)  # (B, Hkv, Sq, nblocks), forced blocks included
        bs = pat.block_size
        return (lambda b, h, qi, ki: (ki <= qi + off) & sel[b, h // G, qi, ki // bs]), True
    raise Unsupported(f"FlexAttention cannot express {type(pat).__name__} (it has a linear-attention part)")


class Flex(Impl):
    """torch's FlexAttention with a BlockMask built from the same pattern (create_block_mask),
    compiled with torch.compile (on CPU the uncompiled path materialises the scores)."""
    name, group, compiles = "flex", "flex", True

    def build(self, x: Inputs) -> Built:
        global _FLEX_COMPILED
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unsupported(f"torch {torch.__version__} has no FlexAttention: {e}") from None
        case = x.case
        if not case.softmax:
            raise Unsupported("linear attention is not a softmax mask")
        if case.kind == "window-step":
            raise Unsupported("a decode step against constant-size state has no FlexAttention counterpart")
        if x.pattern is None:
            raise Unsupported("no pattern")
        mask_mod, per_head = _flex_mask_mod(x)
        need = (case.B * case.Hq if per_head else 1) * case.Sq * case.Sk
        if need > FLEX_MASK_LIMIT:
            raise Unsupported(f"create_block_mask would evaluate {need / 1e9:.1f} G mask entries "
                              f"(limit {FLEX_MASK_LIMIT / 1e9:.1f} G)")
        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, case.B if per_head else None, case.Hq if per_head else None,
                               case.Sq, case.Sk, device=x.device)
        prep = time.perf_counter() - t0
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fa, gqa = _FLEX_COMPILED, case.Hq != case.Hkv
        return Built(f"flex (block mask {bm.BLOCK_SIZE[0]}x{bm.BLOCK_SIZE[1]})",
                     _wrap(lambda a, b, c: fa(a, b, c, block_mask=bm, enable_gqa=gqa), x), prep)


# ------------------------------------------------------------- other libraries, if importable
def _importable(module: str):
    try:
        return importlib.import_module(module)
    except Exception:
        return None


class FlashAttn(Impl):
    """flash-attn's flash_attn_func (bottom-right aligned causal mask; window_size=(w-1, 0))."""
    name, group = "flash_attn", "external"

    def __init__(self, mod):
        self.mod = mod

    def build(self, x: Inputs) -> Built:
        import sparse_attn as sa
        pat = x.pattern
        if isinstance(pat, sa.Dense):
            win = (-1, -1)
        elif isinstance(pat, sa.SlidingWindow) and pat.sinks == 0:
            win = (pat.window - 1, 0)
        else:
            raise Unsupported(f"flash-attn has no {type(pat).__name__ if pat is not None else 'linear'} mask")
        fa = self.mod.flash_attn_func
        f = lambda a, b, c: fa(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), causal=True,
                               window_size=win).transpose(1, 2)
        return Built("flash_attn_func", _wrap(f, x))


class FlashInfer(Impl):
    """FlashInfer single-request prefill / decode kernels (forward only)."""
    name, group = "flashinfer", "external"

    def __init__(self, mod):
        self.mod = mod

    def build(self, x: Inputs) -> Built:
        import sparse_attn as sa
        pat, case = x.pattern, x.case
        if case.kind == "train":
            raise Unsupported("FlashInfer has no backward pass")
        if isinstance(pat, sa.Dense):
            left = -1
        elif isinstance(pat, sa.SlidingWindow) and pat.sinks == 0:
            left = pat.window - 1
        else:
            raise Unsupported(f"FlashInfer single-request kernels have no {type(pat).__name__ if pat else 'linear'} mask")
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (x.q, x.k, x.v))  # (S, H, D)
        if case.kind == "decode":
            f = lambda: self.mod.single_decode_with_kv_cache(q[0], k, v, window_left=left)
        else:
            f = lambda: self.mod.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=left)
        return Built("single_" + ("decode" if case.kind == "decode" else "prefill") + "_with_kv_cache",
                     lambda: f().transpose(-2, -3)[None] if case.kind != "decode" else f()[None, :, None])


class Fla(Impl):
    """flash-linear-attention's simple GLA (per-head decay) chunked / fused-recurrent kernels."""
    name, group = "fla", "external"

    def __init__(self, mod):
        self.mod = mod

    def build(self, x: Inputs) -> Built:
        case = x.case
        if case.softmax:
            raise Unsupported("fla is benchmarked on linear attention only")
        if case.family == "delta":  # chunk_gated_delta_rule, (B, S, H, D) layout
            gdr = importlib.import_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
            beta, g = x.beta, x.decay
            return Built("chunk_gated_delta_rule", _wrap(lambda a, b, c: gdr(
                q=a.transpose(1, 2), k=b.transpose(1, 2), v=c.transpose(1, 2), g=g.transpose(1, 2),
                beta=beta.transpose(1, 2), use_qk_l2norm_in_kernel=True)[0].transpose(1, 2), x))
        ops = importlib.import_module("fla.ops.simple_gla")
        b, h, s, d = x.q.shape
        if case.kind in ("linear-decode", "linear-step"):
            q, k, v = (t[:, :, -1:].transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))
            g = x.decay.to(torch.float32).expand(b, 1, h).contiguous()
            st = x.state.to(torch.float32)
            return Built("fused_recurrent_simple_gla",
                         lambda: ops.fused_recurrent_simple_gla(q, k, v, g, initial_state=st,
                                                                output_final_state=True)[0].transpose(1, 2))
        q, k, v = (t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))
        g = x.decay.to(torch.float32).expand(b, s, h).contiguous()
        return Built("chunk_simple_gla", lambda: ops.chunk_simple_gla(q, k, v, g)[0].transpose(1, 2))


class HfDeltaFallback(Impl):
    """transformers' PyTorch Gated DeltaNet (`torch_chunk_gated_delta_rule` of Qwen3-Next): what a
    user of that model runs without fla (on every CPU); delta-rule rows only."""
    name, group = "transformers", "external"

    def build(self, x: Inputs) -> Built:
        if x.case.family != "delta":
            raise Unsupported("transformers' fallback is benchmarked on the delta rule only")
        try:
            from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
        except Exception as e:
            raise Unsupported(f"transformers' Qwen3-Next is not importable: {type(e).__name__}: {e}") from None
        beta, g = x.beta, x.decay

        def f(a, b, c):  # its layout is (B, S, H, D)
            o, _ = torch_chunk_gated_delta_rule(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                                                g.transpose(1, 2), beta.transpose(1, 2), use_qk_l2norm_in_kernel=True)
            return o.transpose(1, 2)
        return Built("torch_chunk_gated_delta_rule", _wrap(f, x))


def external_impls() -> tuple[list[Impl], dict]:
    """The importable ones, and {module: version or 'not installed'} for the report."""
    found, seen = [], {}
    for module, cls in (("flash_attn", FlashAttn), ("flashinfer", FlashInfer), ("fla", Fla)):
        mod = _importable(module)
        seen[module] = getattr(mod, "__version__", "installed") if mod is not None else "not installed"
        if mod is not None:
            found.append(cls(mod))
    return found, seen


def all_impls(device: torch.device) -> tuple[list[Impl], dict]:
    ext, seen = external_impls()
    return sparse_attn_impls() + sdpa_impls() + [Flex(), HfDeltaFallback()] + ext, seen

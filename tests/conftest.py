"""Shared fixtures and helpers of the test suite: seeding, input and pattern makers, the covering
design generator, and the forward + backward comparison against the float64 oracle."""
from __future__ import annotations

import itertools
import math
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

#: Triton kernels run on CPU tensors in Triton's interpreter; `@triton.jit` reads this when the
#: kernel modules are imported, so it is set before sparse_attn is. On a machine with a GPU the
#: same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
#: where the Triton tests run: "cuda" with a GPU, else "cpu" (interpreter)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import oracle  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
#: backend=None is the scheduler's choice; "reference" the plain-PyTorch path.
BACKENDS = [pytest.param("reference", id="ref"), pytest.param(None, id="auto")]
BLOCK = 16  # block size of BlockSparse / TopK in the matrix; every length below is not a multiple of it
#: SPARSE_ATTN_DISABLE_JIT=1 (the Arm and no-compiler CI stages): the C++ extensions are not built
NO_JIT = os.environ.get("SPARSE_ATTN_DISABLE_JIT") == "1"
#: the one marker of every test that needs a C++ extension built
needs_jit = pytest.mark.skipif(NO_JIT, reason="SPARSE_ATTN_DISABLE_JIT=1: the C++ extensions are not built")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the larger cases (4K-token linear attention, memory)")
    config.addinivalue_line("markers", "gpu: runs compiled on a GPU when there is one (bench/gpu_check.sh runs `-m gpu`)")


_POISON = os.environ.get("SPARSE_ATTN_TEST_POISON", "1") != "0"


def _poisoned(fn):
    """`fn` (torch.empty and kin) with floating results filled with NaN: on a CPU fresh memory is
    mostly zeros, on a GPU the caching allocator hands back old tensors, so a kernel that reads
    memory it never wrote passed here and failed there (the first GPU run, 2026-12-04). NaN makes
    it fail here too."""
    def empty(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t
    return empty


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every test sees torch.empty / empty_like / new_empty return NaN-filled floating tensors
    (SPARSE_ATTN_TEST_POISON=0 turns it off)."""
    if _POISON:
        monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
        monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
        monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test starts from its own fixed seed (a hash of its id): fresh inputs, deterministic."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def randn(*shape, dtype=torch.float32, requires_grad=False, scale=1.0):
    """Normal random leaf tensor of `dtype` (drawn in float32, then rounded)."""
    x = (torch.randn(*shape) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def make_qkv(b, hq, hkv, sq, sk, d, dv=None, *, dtype=torch.float32, requires_grad=False):
    dv = d if dv is None else dv
    return (randn(b, hq, sq, d, dtype=dtype, requires_grad=requires_grad),
            randn(b, hkv, sk, d, dtype=dtype, requires_grad=requires_grad),
            randn(b, hkv, sk, dv, dtype=dtype, requires_grad=requires_grad))


def pattern_on(pattern, device):
    """`pattern` with its BlockSparse layout (the one pattern that holds a tensor) on `device`."""
    import sparse_attn as sa

    if isinstance(pattern, sa.BlockSparse):
        return sa.BlockSparse(pattern.layout.to(device), block_size=pattern.block_size)
    return pattern


def random_layout(b, hkv, sk, bs, density=0.5):
    """Random bool block layout `(b, hkv, ceil(Sk/bs), ceil(Sk/bs))`: some query blocks see nothing."""
    nb = math.ceil(sk / bs)
    return torch.rand(b, hkv, nb, nb) < density


def make_pattern(kind: str, *, b: int, hkv: int, sk: int, bs: int = BLOCK):
    """The pattern named `kind` for these shapes (BlockSparse draws a random layout)."""
    import sparse_attn as sa
    if kind == "dense_causal":
        return sa.Dense()
    if kind == "dense_full":
        return sa.Dense(causal=False)
    if kind == "window":
        return sa.SlidingWindow(20)
    if kind == "window_sinks":
        return sa.SlidingWindow(13, sinks=3)
    if kind == "blocksparse":
        return sa.BlockSparse(random_layout(b, hkv, sk, bs), block_size=bs)
    if kind == "blocksparse_bcast":  # layout broadcast over batch and kv heads
        return sa.BlockSparse(random_layout(1, 1, sk, bs), block_size=bs)
    if kind == "topk":
        return sa.TopK(1, block_size=bs, sink_blocks=1, local_blocks=1)
    if kind == "topk_wide":
        return sa.TopK(2, block_size=bs // 2, sink_blocks=0, local_blocks=2)
    if kind == "window_linear":
        return sa.WindowLinear(13, sinks=2)
    raise KeyError(kind)


PATTERN_KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk",
                 "window_linear"]


def topk_margin(q, k, pattern) -> float:
    """Smallest gap, relative to the score spread, between the last selected and the first rejected
    candidate block of any query row (inf if no row has to choose). A tiny gap means the selection
    hangs on rounding, so tests redraw such inputs."""
    scores = oracle.oracle_block_scores(q, k, pattern.block_size)
    sel = oracle.oracle_select_blocks(q, k, pattern)
    bs, sk, sq = pattern.block_size, k.shape[2], q.shape[2]
    n = torch.arange(scores.shape[-1])
    spread = scores.std().item() if scores.numel() > 1 else 1.0
    best = math.inf
    for t, p in enumerate(oracle.query_positions(sq, sk).tolist()):
        pb = p // bs
        forced = (n <= pb) & ((n < pattern.sink_blocks) | (n > pb - pattern.local_blocks))
        cand = (n < pb) & ~forced
        if int(cand.sum()) <= pattern.topk or pattern.topk == 0:
            continue
        s = scores[:, :, t]
        chosen = s.masked_fill(~(sel[:, :, t] & cand), math.inf).amin(-1)
        rejected = s.masked_fill(~(~sel[:, :, t] & cand), -math.inf).amax(-1)
        best = min(best, (chosen - rejected).min().item() / spread)
    return best


def make_qkv_for(pattern, *args, dtype=torch.float32, requires_grad=False, min_margin=1e-3, **kw):
    """`make_qkv`, redrawn (deterministically) until a TopK selection is not decided by rounding."""
    for _ in range(100):
        q, k, v = make_qkv(*args, dtype=dtype, requires_grad=requires_grad, **kw)
        if type(pattern).__name__ != "TopK" or topk_margin(q, k, pattern) > min_margin:
            return q, k, v
    raise RuntimeError("could not draw a well-separated TopK input")


# ----------------------------------------------------------------------------------------------
# covering design
# ----------------------------------------------------------------------------------------------
def _pair(m, v, o, w):
    return ((m, v), (o, w)) if m < o else ((o, w), (m, v))


def pairwise(axes: dict[str, list]) -> list[dict]:
    """A deterministic greedy all-pairs covering design: every pair of values of any two axes
    appears in at least one case (so every value of every axis appears too)."""
    names = list(axes)
    idx = {n: range(len(axes[n])) for n in names}
    uncovered = {((a, i), (b, j)) for a, b in itertools.combinations(range(len(names)), 2)
                 for i in idx[names[a]] for j in idx[names[b]]}
    cases = []
    while uncovered:
        (a, i), (b, j) = min(uncovered)
        case = {a: i, b: j}
        for m in range(len(names)):
            if m in case:
                continue
            def gain(v):
                return sum(_pair(m, v, o, w) in uncovered for o, w in case.items())
            case[m] = max(idx[names[m]], key=lambda v: (gain(v), -v))
        for x, y in itertools.combinations(sorted(case), 2):
            uncovered.discard(((x, case[x]), (y, case[y])))
        cases.append({names[m]: axes[names[m]][v] for m, v in sorted(case.items())})
    return cases


# ----------------------------------------------------------------------------------------------
# forward + backward against the oracle
# ----------------------------------------------------------------------------------------------
def leaf64(x):
    return x.detach().to(torch.float64).requires_grad_(x.requires_grad)


def leaf_same(x):
    return x.detach().clone().requires_grad_(x.requires_grad)


def check_against_oracle(run, ref_fn, base_fn, inputs: dict, *, dtype, device="cpu", grads=True):
    """Run `run(**inputs)` (the package), `ref_fn(**float64 copies)` (the oracle) and, for float16 /
    bfloat16, `base_fn(**copies in dtype)` (the plain evaluation in that dtype); compare the outputs
    and the gradients of every input that requires grad, with the contract's bounds.

    Returns the package output. Tensor inputs that are None or non-tensors are passed through."""
    def tensors(d):
        return {n: x for n, x in d.items() if isinstance(x, torch.Tensor) and x.requires_grad}

    out = run(**inputs)
    assert isinstance(out, torch.Tensor), type(out)
    ins64 = {n: leaf64(x) if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}
    ref = ref_fn(**ins64)
    assert out.shape == ref.shape, f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    low = dtype in oracle.LOW_PRECISION
    if low:
        ins_b = {n: leaf_same(x) if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}
        base = base_fn(**ins_b)
    oracle.assert_close_contract(out, ref, dtype=dtype, device=device,
                                 lowp_baseline=base if low else None, what="output")
    if not grads or not tensors(inputs):
        return out
    go = randn(*out.shape, dtype=dtype).to(out.device)
    names = list(tensors(inputs))
    g = torch.autograd.grad(out, [inputs[n] for n in names], go)
    g64 = torch.autograd.grad(ref, [ins64[n] for n in names], go.to(torch.float64))
    gb = torch.autograd.grad(base, [ins_b[n] for n in names], go) if low else [None] * len(names)
    for n, gp, gr, gl in zip(names, g, g64, gb):
        oracle.assert_close_contract(gp, gr, dtype=inputs[n].dtype, device=device,
                                     lowp_baseline=gl, what=f"d{n}")
    return out


def cpu_flags() -> set:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def shuffled_pages(k, v, page):
    """The keys of (B, Hkv, S, D) tensors as pages in shuffled order: (pages K (P, Hkv, page, D),
    pages V, table (B, W) int32)."""
    b, hkv, n, _ = k.shape
    w = -(-n // page)
    order = torch.randperm(b * w).view(b, w).to(torch.int32)
    kp = torch.zeros(b * w, hkv, page, k.shape[3], dtype=k.dtype)
    vp = torch.zeros(b * w, hkv, page, v.shape[3], dtype=v.dtype)
    for i in range(b):
        for s in range(w):
            a, z = s * page, min(n, (s + 1) * page)
            kp[order[i, s], :, :z - a] = k[i, :, a:z]
            vp[order[i, s], :, :z - a] = v[i, :, a:z]
    return kp, vp, order


# ----------------------------------------------------------------------------------------------
# AMX tiles and the vector products they replace (test_cpu_decode_amx.py, test_cpu_prefill_amx.py)

def cpu_forward_ext():
    """The "cpu" extension (cpu.block_sparse's forward and backward), built on first use."""
    from sparse_attn.backends.cpu.kernels import _ext
    return _ext()


def amx_or_vector(ext, which: str):
    """Generator for a fixture: the extension's bf16 products on AMX tiles ("amx") or its vector
    products ("vector") for one test, the switch restored after; skips where that path is absent."""
    if not ext.bf16_dot:
        pytest.skip("no AVX-512 BF16 / Arm BF16 products in this build: bfloat16 runs in float32")
    if which == "amx" and not ext.amx_built:
        pytest.skip("this CPU / build has no AMX tiles")
    before = ext.amx_enabled()
    ext.set_amx(which == "amx")
    if which == "amx" and not ext.amx_enabled():
        ext.set_amx(before)
        pytest.skip("Linux refused this process AMX tiles (arch_prctl)")
    yield which
    ext.set_amx(before)


def amx_test_pattern(kind: str, b: int, hkv: int, sk: int, window: int):
    """Dense, SlidingWindow(window, sinks=5), TopK(3) or a random 40% BlockSparse, 32-key blocks."""
    import sparse_attn as sa
    if kind == "dense":
        return sa.Dense()
    if kind == "window":
        return sa.SlidingWindow(window, sinks=5)
    if kind == "topk":
        return sa.TopK(3, block_size=32)
    nb = -(-sk // 32)
    lay = torch.rand(b, hkv, nb, nb) < 0.4
    lay[..., torch.arange(nb), torch.arange(nb)] = True
    return sa.BlockSparse(lay, block_size=32)


def assert_amx_built_follows_the_cpu(ext) -> None:
    """A native JIT build (-march=native) has the extension's tiles exactly where the CPU has
    AMX-TILE and AMX-BF16 (with AVX-512 BF16) on Linux x86-64; its switch turns them off and on."""
    import platform
    flags = cpu_flags()
    if (not flags or ext.__name__.startswith("sparse_attn._ext_") or platform.machine() != "x86_64"
            or os.environ.get("SPARSE_ATTN_CPU_TARGET", "").strip()):
        pytest.skip("no /proc/cpuinfo, an ahead-of-time build, a JIT build for another target "
                    "(SPARSE_ATTN_CPU_TARGET), or not x86-64")
    assert bool(ext.amx_built) == ({"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= flags)
    before = ext.amx_enabled()
    try:
        ext.set_amx(False)
        assert ext.amx_enabled() is False
        ext.set_amx(True)
        assert ext.amx_enabled() == bool(ext.amx_built)  # Linux >= 5.16 grants the tiles
    finally:
        ext.set_amx(before)


def assert_amx_env_switch(ext_expr: str) -> None:
    """SPARSE_ATTN_CPU_AMX=0 in a new process's environment starts `ext_expr`'s tiles (Python code
    naming the extension) off; =1 leaves them on wherever they are built."""
    import subprocess

    def state(value):
        code = f"e = {ext_expr}; print(int(e.amx_built), int(e.amx_enabled()))"
        env = dict(os.environ, SPARSE_ATTN_CPU_AMX=value)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return tuple(map(int, res.stdout.split()[-2:]))

    built, enabled = state("0")
    assert enabled == 0
    assert state("1") == (built, built)


def with_tiles_and_without(ext, run):
    """[run() with the extension's AMX tiles on, run() with them off] (the switch restored after);
    skips where either path is absent."""
    if not (ext.bf16_dot and ext.amx_built):
        pytest.skip("needs both the vdpbf16ps products and AMX tiles")
    before = ext.amx_enabled()
    outs = []
    try:
        for on in (True, False):
            ext.set_amx(on)
            if on and not ext.amx_enabled():
                pytest.skip("Linux refused this process AMX tiles (arch_prctl)")
            outs.append(run())
    finally:
        ext.set_amx(before)
    return outs

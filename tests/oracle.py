"""The float64 oracle: the contract's definitions (shared/CONTRACT.md), evaluated literally.

Written for reading, not for speed: it builds full `(Sq, Sk)` masks and runs the linear-attention
recurrence one token at a time, so keep the sizes small. It imports nothing from `sparse_attn`: a
pattern is recognised by its class name and only its fields are read (`window`, `sinks`, `layout`,
`block_size`, `topk`, `sink_blocks`, `local_blocks`, `causal`).

Every function upcasts its inputs to float64 (differentiably, so `torch.autograd` on the result gives
the float64 gradients), except `masked_attention_in_dtype` / `masked_linear_attention_in_dtype`,
which are the contract's "plain PyTorch masked-attention evaluation done in that dtype": the same
math with no upcast, used as the baseline of the float16 / bfloat16 "twice the error" rule.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# positions and masks
# ----------------------------------------------------------------------------------------------
def query_positions(sq: int, sk: int, device=None) -> torch.Tensor:
    """Absolute position of each query row: queries are aligned to the END of the keys."""
    return torch.arange(sk - sq, sk, device=device)


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D): query head h reads kv head h // (Hq // Hkv)."""
    hkv = x.shape[1]
    assert hq % hkv == 0, (hq, hkv)
    return x.repeat_interleave(hq // hkv, dim=1)


def _kind(pattern) -> str:
    return type(pattern).__name__


def _block_means(k: torch.Tensor, bs: int) -> torch.Tensor:
    """(B, Hkv, Sk, D) -> (B, Hkv, ceil(Sk/bs), D): mean key of each block; the last may be partial."""
    sk = k.shape[2]
    nb = math.ceil(sk / bs)
    means = [k[:, :, n * bs:min((n + 1) * bs, sk)].mean(dim=2) for n in range(nb)]
    if not means:
        return k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
    return torch.stack(means, dim=2)


def oracle_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """TopK block scores `s[b, hkv, t, n] = (1/G) sum_{h in group} q[b, h, t] . kbar[b, hkv, n]` (float64)."""
    q, k = q.to(F64), k.to(F64)
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kbar = _block_means(k, block_size)                              # (B, Hkv, nb, D)
    qsum = q.reshape(b, hkv, g, sq, d).mean(dim=2)                  # group-averaged query
    return qsum @ kbar.transpose(-1, -2)                            # (B, Hkv, Sq, nb)


def oracle_select_blocks(q: torch.Tensor, k: torch.Tensor, pattern) -> torch.Tensor:
    """The contract's TopK selection, per query token: bool `(B, Hkv, Sq, ceil(Sk/bs))`.

    Forced: blocks `n < sink_blocks` and `pb - local_blocks < n <= pb` (pb = p // bs); plus the `topk`
    highest-scoring blocks among the remaining blocks `n < pb`, a NaN score highest, equal scores to
    the lower block (the contract's InfLLMv2 rule; the contract leaves TopK's ties open). Selection is causal: no block after
    the query's own block `pb` is ever selected (a sink block beyond `pb` holds no visible key).
    """
    assert _kind(pattern) == "TopK", pattern
    bs, topk = pattern.block_size, pattern.topk
    b, hkv, sk = k.shape[0], k.shape[1], k.shape[2]
    sq = q.shape[2]
    nb = math.ceil(sk / bs)
    scores = oracle_block_scores(q, k, bs)
    sel = torch.zeros(b, hkv, sq, nb, dtype=torch.bool, device=q.device)
    n = torch.arange(nb, device=q.device)
    for t, p in enumerate(query_positions(sq, sk).tolist()):
        pb = p // bs
        forced = (n <= pb) & ((n < pattern.sink_blocks) | (n > pb - pattern.local_blocks))
        candidates = (n < pb) & ~forced
        sel[:, :, t] = forced
        ncand = int(candidates.sum())
        if ncand == 0 or topk == 0:
            continue
        s = scores[:, :, t]                                        # (B, Hkv, nb)
        # NaN first, a -inf candidate above the non-candidates; equal scores to the lower block
        s = torch.where(torch.isnan(s), math.inf, torch.where(torch.isneginf(s), -1e308, s))
        s = s.masked_fill(~candidates, -math.inf)
        top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :min(topk, ncand)]
        sel[:, :, t].scatter_(-1, top, True)
    return sel


def visibility_mask(q: torch.Tensor, k: torch.Tensor, pattern) -> torch.Tensor:
    """Bool mask `(B, Hq, Sq, Sk)` of the contract's table: key j visible to the query at position p."""
    b, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    hkv, sk = k.shape[1], k.shape[2]
    p = query_positions(sq, sk, q.device)[:, None]                 # (Sq, 1)
    j = torch.arange(sk, device=q.device)[None, :]                  # (1, Sk)
    causal = j <= p
    kind = _kind(pattern)
    if kind == "Dense":
        m = causal if pattern.causal else torch.ones_like(causal)
        return m.expand(b, hq, sq, sk)
    if kind in ("SlidingWindow", "WindowLinear"):
        m = causal & (((p - j) < pattern.window) | (j < pattern.sinks))
        return m.expand(b, hq, sq, sk)
    if kind == "BlockSparse":
        bs = pattern.block_size
        lay = pattern.layout.to(q.device)
        lay = lay.expand(b, hkv, lay.shape[2], lay.shape[3])
        lay = lay[:, :, (p[:, 0] // bs)][:, :, :, (j[0] // bs)]     # (B, Hkv, Sq, Sk)
        return _expand_kv(lay, hq) & causal
    if kind == "TopK":
        sel = oracle_select_blocks(q, k, pattern)                  # (B, Hkv, Sq, nb)
        m = sel[..., j[0] // pattern.block_size]                    # (B, Hkv, Sq, Sk)
        return _expand_kv(m, hq) & causal
    raise TypeError(f"oracle: unknown pattern {pattern!r}")


# ----------------------------------------------------------------------------------------------
# softmax attention
# ----------------------------------------------------------------------------------------------
def _masked_softmax_attention(q, k, v, mask, scale, sink_logits=None, softcap=None):
    """softmax(scale q k^T, masked) v in the dtype of q; rows with no visible key give 0.

    `softcap`: scores become `softcap * tanh(s / softcap)`; `sink_logits` `(Hq,)`: one more logit per
    row in the softmax denominator, with no value (its column is dropped after the softmax)."""
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    has_key = mask.any(dim=-1, keepdim=True)
    s = s.masked_fill(~mask, -math.inf)
    s = torch.where(has_key, s, torch.zeros_like(s))               # keep empty rows finite
    if sink_logits is not None:
        sink = sink_logits.to(s.dtype).reshape(1, hq, 1, 1).expand(*s.shape[:3], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1] * mask * has_key
    else:
        p = torch.softmax(s, dim=-1) * mask * has_key
    return p @ v


def _linear_memory(q, k, v, mask):
    """`L_t = phi(q_t)^T M_t / phi(q_t)^T z_t` over the keys in `mask`, phi = elu + 1; 0 if none."""
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2) * mask   # (B, Hq, Sq, Sk)
    num = a @ v
    den = a.sum(dim=-1, keepdim=True)
    has_key = mask.any(dim=-1, keepdim=True)
    return torch.where(has_key, num / torch.where(has_key, den, torch.ones_like(den)), torch.zeros_like(num))


def _attention(q, k, v, pattern, scale, gate, mask, sink_logits=None, softcap=None):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _kind(pattern) != "WindowLinear":
        return _masked_softmax_attention(q, k, v, mask, scale, sink_logits, softcap)
    if gate is None:
        raise ValueError("oracle: WindowLinear needs gate")
    a = _masked_softmax_attention(q, k, v, mask, scale)
    sk = k.shape[2]
    p = query_positions(q.shape[2], sk, q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    evicted = (j <= p) & ~mask                                     # keys j <= p the window misses
    lin = _linear_memory(q, k, v, evicted)
    sg = torch.sigmoid(gate).reshape(1, -1, 1, 1)
    return sg * a + (1 - sg) * lin


def oracle_attention(q, k, v, pattern, *, scale=None, gate=None, sink_logits=None, softcap=None):
    """float64 `attention(q, k, v, pattern, scale=, gate=, sink_logits=, softcap=)`: q (B,Hq,Sq,D),
    k (B,Hkv,Sk,D), v (B,Hkv,Sk,Dv), sink_logits (Hq,)."""
    q64, k64, v64 = q.to(F64), k.to(F64), v.to(F64)
    g64 = None if gate is None else gate.to(F64)
    s64 = None if sink_logits is None else sink_logits.to(F64)
    mask = visibility_mask(q64, k64, pattern)
    return _attention(q64, k64, v64, pattern, scale, g64, mask, s64, softcap)


def masked_attention_in_dtype(q, k, v, pattern, *, scale=None, gate=None, sink_logits=None, softcap=None):
    """The plain masked evaluation in the inputs' own dtype (no upcast): the low-precision baseline.

    The visibility mask (for TopK: the selection) is the float64 oracle's, so the baseline measures
    the arithmetic error of the dtype, not a different selection.
    """
    with torch.no_grad():
        mask = visibility_mask(q.detach().to(F64), k.detach().to(F64), pattern)
    return _attention(q, k, v, pattern, scale, gate, mask, sink_logits, softcap)


# ----------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------
def _log_decays(decay, b, h, s, device, dtype):
    """The per-token log-decay g as (B, H, S)."""
    if decay is None:
        return torch.zeros(b, h, s, device=device, dtype=dtype)
    decay = decay.to(dtype)
    if decay.dim() == 1:
        return decay[None, :, None].expand(b, h, s)
    return decay


class _single_thread:
    """The recurrences below are thousands of tiny ops: one thread avoids the pool's sync overhead."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


class _Recurrence(torch.autograd.Function):
    """`S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`, one token at a time, float64.

    The backward is the adjoint recurrence (written out because autograd through thousands of steps
    is slow); tests/test_oracle.py checks it with `torch.autograd.gradcheck`. With `L_t = dLoss/dS_t`:
    `L_t = scale q_t do_t^T + exp(g_{t+1}) L_{t+1}` (+ dS_final at the end), `dq_t = scale S_t do_t`,
    `dk_t = L_t v_t`, `dv_t = L_t^T k_t`, `dg_t = exp(g_t) <L_t, S_{t-1}>`, `dS_0 = exp(g_1) L_1`.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale):
        states = [s0]
        outs = []
        with _single_thread():
            for t in range(q.shape[2]):
                st = torch.exp(g[:, :, t])[..., None, None] * states[-1] + k[:, :, t, :, None] * v[:, :, t, None, :]
                states.append(st)
                outs.append(scale * (q[:, :, t, None, :] @ st)[:, :, 0])
        o = torch.stack(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
        ctx.save_for_backward(q, k, v, g, torch.stack(states, dim=2))
        ctx.scale = scale
        return o, states[-1]

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, g, states = ctx.saved_tensors
        scale = ctx.scale
        dq, dk, dv, dg = (torch.zeros_like(x) for x in (q, k, v, g))
        lam = torch.zeros_like(states[:, :, 0]) if dsf is None else dsf.clone()
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype) if do is None else do
        with _single_thread():
            for t in reversed(range(q.shape[2])):
                if t + 1 < q.shape[2]:
                    lam = torch.exp(g[:, :, t + 1])[..., None, None] * lam
                lam = lam + scale * q[:, :, t, :, None] * do[:, :, t, None, :]
                dq[:, :, t] = scale * (states[:, :, t + 1] @ do[:, :, t, :, None])[..., 0]
                dk[:, :, t] = (lam @ v[:, :, t, :, None])[..., 0]
                dv[:, :, t] = (lam.transpose(-1, -2) @ k[:, :, t, :, None])[..., 0]
                dg[:, :, t] = torch.exp(g[:, :, t]) * (lam * states[:, :, t]).sum(dim=(-1, -2))
        ds0 = torch.exp(g[:, :, 0])[..., None, None] * lam if q.shape[2] else lam
        return dq, dk, dv, dg, ds0, None


def oracle_linear_attention(q, k, v, *, decay=None, scale=None, initial_state=None):
    """Step-by-step recurrence `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t` in float64.

    q, k (B,H,S,D), v (B,H,S,Dv); decay None | (H,) | (B,H,S). Returns (o (B,H,S,Dv), S_final (B,H,D,Dv)).
    Differentiable in q, k, v, decay and initial_state.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    b, h, s, d = q.shape
    dv = v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    g = _log_decays(decay, b, h, s, q.device, F64)
    s0 = (torch.zeros(b, h, d, dv, dtype=F64, device=q.device) if initial_state is None
          else initial_state.to(F64))
    return _Recurrence.apply(q, k, v, g, s0, scale)


def masked_linear_attention_in_dtype(q, k, v, *, decay=None, scale=None, initial_state=None):
    """The quadratic (masked) form of linear attention in the inputs' own dtype: the low-precision baseline.

    `o_t = scale * (sum_{s<=t} exp(G_t - G_s) (q_t.k_s) v_s + exp(G_t) q_t^T S_0)`, G = cumsum(g).
    """
    b, h, s, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    g = _log_decays(decay, b, h, s, q.device, q.dtype)
    acc = torch.promote_types(q.dtype, torch.float32)             # log-decays summed in >= float32
    cg = torch.cumsum(g.to(acc), dim=-1)
    diff = cg[..., :, None] - cg[..., None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    dmat = torch.exp(diff.masked_fill(~causal, -math.inf)).to(q.dtype)
    o = ((q @ k.transpose(-1, -2)) * dmat) @ v
    if initial_state is not None:
        o = o + torch.exp(cg).to(q.dtype)[..., None] * (q @ initial_state.to(q.dtype))
    return o * scale


# ----------------------------------------------------------------------------------------------
# errors and the contract's bounds
# ----------------------------------------------------------------------------------------------
#: relative-error bounds of the contract ("Numerics"); float64 is ours: any sane float64 kernel meets it.
BOUNDS = {
    (torch.float32, "cpu"): 1e-5,
    (torch.float32, "gpu"): 1e-3,
    (torch.float16, None): 2e-3,
    (torch.bfloat16, None): 1.6e-2,
    (torch.float64, None): 1e-10,
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`||out - ref|| / ||ref||` in float64; the absolute norm `||out - ref||` when `ref` is all zero."""
    out = out.detach().to(F64).cpu()
    ref = ref.detach().to(F64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    diff = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return diff / den if den > 0 else diff


def bound_for(dtype: torch.dtype, device) -> float:
    """The contract's bound for outputs of this dtype computed on this device (str or torch.device)."""
    if dtype == torch.float32:
        return BOUNDS[(dtype, "cpu" if torch.device(device).type == "cpu" else "gpu")]
    return BOUNDS[(dtype, None)]


def assert_close_contract(out, ref, *, dtype, device, lowp_baseline=None, what="output", out_dtype=None):
    """Assert the contract's numerics: rel_err <= bound(dtype, device); NaN/inf never pass.

    `dtype` is the dtype of the computation's inputs; `out` must have dtype `out_dtype` (default
    `dtype`; e.g. float32 for a linear-attention state computed from bfloat16 inputs).
    For float16 / bfloat16, `lowp_baseline` (the same quantity from `masked_attention_in_dtype`, as a
    tensor, or its error as a float) adds the rule `err <= 2 * baseline_err + 1e-6`.
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    assert out.dtype == out_dtype, f"{what}: dtype {out.dtype}, expected {out_dtype}"
    assert torch.isfinite(out.detach().to(F64)).all(), f"{what}: contains NaN or inf"
    err = rel_err(out, ref)
    bound = bound_for(dtype, device)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} ({dtype}, {device})"
    if dtype in LOW_PRECISION and lowp_baseline is not None:
        base = lowp_baseline if isinstance(lowp_baseline, float) else rel_err(lowp_baseline, ref)
        assert err <= 2 * base + 1e-6, (
            f"{what}: relative error {err:.3e} > 2 * baseline {base:.3e} + 1e-6 ({dtype})")
    return err

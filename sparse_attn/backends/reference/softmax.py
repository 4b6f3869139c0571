"""Softmax attention for every pattern in plain PyTorch: the portable reference path.

Queries are processed in chunks of rows; each chunk only touches the keys its pattern can see
(`Pattern.key_range` plus sinks) and builds the token mask of that chunk alone, so the largest
intermediate is `rows x keys_in_range`, sized by `_CHUNK_ELEMS`, never `Sq x Sk`. The backward
pass is the flash-attention one written with plain tensor ops: it saves only the output and the
log-sum-exp of each row, and recomputes each chunk's probabilities, so training memory is
linear in the length too. Accumulation is float32 (float64 for float64 inputs). Runs on any
torch device. Not twice differentiable.

Long-lived buffers (the output, dq, dk, dv) are allocated once before the loop: interleaving
them with the growing transient score matrices fragments the CPU heap (glibc) until it holds
about `Sq x Sk`.
"""
from __future__ import annotations

import torch

from ...layout.block_layout import index_to_bool
from ...layout.topk_selection import topk_token_index
from ...layout.infllmv2_selection import infllmv2_token_index
from ...patterns import InfLLMv2, TopK

#: elements of one chunk's score matrix (B * Hq * rows * keys); 4M floats = 16 MiB
_CHUNK_ELEMS = 1 << 22
#: query rows per chunk at most, so even a small problem never forms a whole Sq x Sk score matrix
_MAX_ROWS = 256


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nonfinite_to_nan(s: torch.Tensor) -> torch.Tensor:
    """Scores before masking: a non-finite score (from an infinite or NaN query or key) becomes NaN,
    so a score of -inf computed from an infinity is never mistaken for a masked pair, and the row
    that sees it comes out NaN (contract, "Bad input": never finite and wrong)."""
    return torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))


def cap_scores(s: torch.Tensor, softcap) -> torch.Tensor:
    """Logit soft-capping (contract): `softcap * tanh(s / softcap)`; identity for None. A NaN score
    stays NaN (the caller turned non-finite scores into NaN before)."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def chunk_rows(pattern, *, batch_heads: int, sq: int, sk: int) -> int:
    """Rows per chunk so that one chunk's score matrix stays near `_CHUNK_ELEMS`."""
    lo, hi = pattern.key_range(sk - 1, sk, sk)  # the keys a late query reaches through its range
    reach = (hi - lo) + pattern.sink_tokens(sk)
    windowed = lo > 0  # a chunk of r rows then touches about r + reach keys, else up to sk
    keys = min(sk, 2 * reach) if windowed else sk
    rows = _CHUNK_ELEMS // max(1, batch_heads * keys)
    if windowed:
        rows = min(rows, reach)
    return max(1, min(max(sq, 1), rows, _MAX_ROWS))


def _chunk_keys(pattern, p_lo: int, p_hi: int, sk: int, device):
    """Key positions a chunk of queries [p_lo, p_hi) may see: sinks below the range, then the range."""
    lo, hi = pattern.key_range(p_lo, p_hi, sk)
    sinks = min(pattern.sink_tokens(sk), lo)
    if sinks > 0:
        return torch.cat([torch.arange(sinks, device=device), torch.arange(lo, hi, device=device)]), None
    return None, (lo, hi)


class _Chunk:
    """The keys one chunk of queries may see, and that chunk's token mask."""

    def __init__(self, pattern, r0: int, r1: int, sq: int, sk: int, device, token_index, nb: int):
        off = sk - sq
        self.r0, self.r1 = r0, r1
        self.qpos = torch.arange(off + r0, off + r1, device=device)
        self.kidx, self.krange = _chunk_keys(pattern, off + r0, off + r1, sk, device)
        if self.kidx is not None:
            kpos = self.kidx
        else:
            kpos = torch.arange(*self.krange, device=device)
        selected = index_to_bool(token_index[:, :, r0:r1], nb) if token_index is not None else None
        mask = pattern.token_mask(self.qpos, kpos, selected=selected)
        self.mask = mask[None, None, None] if mask.dim() == 2 else mask[:, :, None]  # (B', H', 1|G, r, n)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The chunk's keys (or values) of `x` `(B, Hkv, Sk, *)` -> `(B, Hkv, 1, n, *)`."""
        if self.kidx is not None:
            return x.index_select(2, self.kidx)[:, :, None]
        lo, hi = self.krange
        return x[:, :, None, lo:hi]

    def add_to(self, dx: torch.Tensor, part: torch.Tensor) -> None:
        """dx[keys] += part `(B, Hkv, n, *)`."""
        if self.kidx is not None:
            dx.index_add_(2, self.kidx, part)
        else:
            lo, hi = self.krange
            dx[:, :, lo:hi] += part


def _chunks(pattern, q_shape, sk, device, token_index):
    b, hkv, g, sq, _ = q_shape
    if sk == 0:  # no key at all (Dense(causal=False) allows Sq > Sk = 0): every row outputs 0
        return
    nb = -(-sk // pattern.block_size) if isinstance(pattern, TopK) else 0
    rows = chunk_rows(pattern, batch_heads=b * hkv * g, sq=sq, sk=sk)
    for r0 in range(0, sq, rows):
        yield _Chunk(pattern, r0, min(sq, r0 + rows), sq, sk, device, token_index, nb)


def softmax_forward(q, k, v, pattern, *, scale: float, token_index=None, softcap=None):
    """Forward of the reference softmax attention: `(out (B, Hq, Sq, Dv), lse (B, Hq, Sq))`, both in
    the accumulation dtype (float32; float64 for float64 inputs). `lse` is the natural-log
    log-sum-exp of each row's scaled (and soft-capped) visible scores, `+inf` for a row that sees
    no key (its output is 0). `token_index`: TopK's per-token selection (`topk_token_index`), None
    otherwise. Learned sinks are applied by the caller on `(out, lse)` (backends/sinks.py)."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv if hkv else 1
    acc = acc_dtype(q.dtype)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    ka, va = k.to(acc), v.to(acc)
    out = torch.zeros(b, hkv, g, sq, dv, dtype=acc, device=q.device)
    lse = torch.full((b, hkv, g, sq), float("inf"), dtype=acc, device=q.device)
    for c in _chunks(pattern, qa.shape, sk, q.device, token_index):
        s = nonfinite_to_nan(torch.matmul(qa[:, :, :, c.r0:c.r1], c.take(ka).transpose(-1, -2)) * scale)
        s = cap_scores(s, softcap).masked_fill(~c.mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        # rows with no visible key output 0 (contract); a NaN denominator (a non-finite input the
        # row sees) stays NaN in the output and the lse, never 0
        seen = (denom > 0) | torch.isnan(denom)
        out[:, :, :, c.r0:c.r1] = torch.matmul(p, c.take(va)) / torch.where(seen, denom, torch.ones_like(denom))
        lse[:, :, :, c.r0:c.r1] = torch.where(seen, m + torch.log(denom), torch.full_like(m, float("inf")))[..., 0]
    return out.view(b, hq, sq, dv), lse.view(b, hq, sq)


def softmax_backward(q, k, v, lse, dout, pattern, *, scale: float, token_index=None, softcap=None):
    """The flash backward of :func:`softmax_forward` from the saved `lse` alone (the output is not
    needed: rowsum(P * dP) replaces dO . O). Returns `(dq, dk, dv)` in the inputs' dtypes.
    With `softcap`, the score gradient passes through the cap: `ds = ds_capped * (1 - tanh^2)`."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv if hkv else 1
    acc = acc_dtype(q.dtype)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    ka, va = k.to(acc), v.to(acc)
    do = dout.to(acc).reshape(b, hkv, g, sq, dv)
    lse = lse.to(acc).reshape(b, hkv, g, sq)
    dq = torch.zeros_like(qa)
    dk = torch.zeros_like(ka)
    dvv = torch.zeros_like(va)
    for c in _chunks(pattern, qa.shape, sk, q.device, token_index):
        qc, doc = qa[:, :, :, c.r0:c.r1], do[:, :, :, c.r0:c.r1]
        kc, vc = c.take(ka), c.take(va)
        s = nonfinite_to_nan(torch.matmul(qc, kc.transpose(-1, -2)) * scale)
        if softcap is not None:
            t = torch.tanh(s / softcap)
            s = t * softcap
        s = s.masked_fill(~c.mask, float("-inf"))
        p = torch.exp(s - lse[:, :, :, c.r0:c.r1, None])  # 0 where masked or the row saw nothing
        c.add_to(dvv, torch.matmul(p.transpose(-1, -2), doc).sum(dim=2))
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        # rowsum(P * dP) equals dO . O, but computed from the same P and dP it cancels exactly
        # where it should (a row with one visible key has ds = 0, not float32 residue)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        if softcap is not None:
            ds = ds * (1 - t * t)
        dq[:, :, :, c.r0:c.r1] = torch.matmul(ds, kc) * scale
        c.add_to(dk, torch.matmul(ds.transpose(-1, -2), qc).sum(dim=2) * scale)
    return dq.view(q.shape).to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


def topk_index_for(q, k, pattern):
    """TopK's (or InfLLMv2's) per-token selection (no autograd), or None for the other patterns."""
    if isinstance(pattern, InfLLMv2):
        with torch.no_grad():
            return infllmv2_token_index(q.detach(), k.detach(), pattern)
    if not isinstance(pattern, TopK):
        return None
    with torch.no_grad():
        return topk_token_index(q.detach(), k.detach(), pattern)


class _SoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, token_index, softcap):
        out, lse = softmax_forward(q, k, v, pattern, scale=scale, token_index=token_index, softcap=softcap)
        ctx.save_for_backward(q, k, v, lse, token_index)
        ctx.pattern, ctx.scale, ctx.softcap = pattern, scale, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse, token_index = ctx.saved_tensors
        dq, dk, dv = softmax_backward(q, k, v, lse, dout, ctx.pattern, scale=ctx.scale, token_index=token_index,
                                      softcap=ctx.softcap)
        return dq, dk, dv, None, None, None, None


def softmax_attention(q, k, v, pattern, *, scale: float, token_index=None, out_dtype=None,
                      softcap=None) -> torch.Tensor:
    """Reference attention for Dense, SlidingWindow, BlockSparse and TopK; returns `(B, Hq, Sq, Dv)`
    in `out_dtype` (default q's dtype). Differentiable in q, k, v (the TopK selection is not)."""
    if token_index is None:
        token_index = topk_index_for(q, k, pattern)
    if isinstance(pattern, InfLLMv2):  # selection made: the attention is its TopK view's
        pattern = pattern.attention_view()
    out = _SoftmaxAttention.apply(q, k, v, pattern, float(scale), token_index, softcap)
    return out.to(out_dtype or q.dtype)

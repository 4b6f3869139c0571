"""Attention over a KV cache in plain PyTorch: the portable decode / chunked-prefill path.

Sequence `b` holds `lengths[b]` tokens; its `Sq` query rows sit at the END of them (positions
`lengths[b] - Sq + t`, the contract's alignment, per sequence). Keys are read chunk by chunk through
the cache's view (`KVView.gather`: a slice of a contiguous cache, a gather through a page table)
with an online softmax, so memory is `B x Hq x Sq x chunk`, never `Sq x Sk`; the visibility of
each (query, key) pair is computed on the device from the lengths, the pattern's token rule and
the key blocks each row visits (`layout/decode_blocks.visited_rows`: TopK selects from the
cache's block means, O(blocks)). No host read of device data. Any device, any float dtype
(float64 included), differentiable in q through plain autograd. A quantized cache's chunks come
dequantized from the view (float32), so chunked prefill over one works like decode.
"""
from __future__ import annotations

import torch

from ...layout.decode_blocks import KEY_BLOCK, selection_over_cache, visited_rows
from ...layout.topk_selection import query_positions
from ...patterns import SOFTMAX_PATTERNS, InfLLMv2
from ...scheduler.kernel import Kernel, roofline_seconds
from .softmax import acc_dtype, cap_scores

#: elements of one chunk's score matrix
_CHUNK_ELEMS = 1 << 22
#: Python + ~25 small ops per key chunk, and the setup (positions, rows, selection): at a few
#: dozen keys the loop measured 3-12x the C++ decode kernel's time (docs/caches.md)
_CHUNK_OVERHEAD_S = 300e-6
_SETUP_S = 200e-6


def _first_key(pattern, view, sq: int) -> int:
    """First key any query row can see (host): the window's start below the shortest sequence's
    rows, 0 when the pattern keeps sinks or has no window."""
    if pattern.sink_tokens(view.max_length) or not view.host_lengths:
        return 0
    return pattern.key_range(min(view.host_lengths) - sq, view.max_length, view.max_length)[0]


def _chunk(b: int, hq: int, sq: int) -> int:
    return max(64, _CHUNK_ELEMS // max(1, b * hq * sq))


def _visible(rule, qpos, kpos, lengths, rows, key_block):
    """Bool `(B, 1|Hkv, Sq, n)` visibility of keys `kpos` `(n,)` for query rows at `qpos` `(B, Sq)`."""
    causal, window, sinks = rule
    p = qpos[:, None, :, None]
    j = kpos[None, None, None, :]
    ok = j < lengths.long()[:, None, None, None]
    if causal:
        ok = ok & (j <= p)
    if window:
        ok = ok & ((p - j < window) | (j < sinks))
    if rows is not None:
        ok = ok & rows.index_select(3, kpos // key_block)
    return ok


def cache_attention(q: torch.Tensor, view, pattern, *, scale: float, softcap=None, sink_logits=None) -> torch.Tensor:
    """`(B, Hq, Sq, Dv)` in q's dtype; rows with no visible key give zeros. `softcap` (float) caps
    the scores, `sink_logits` `(Hq,)` joins each row's denominator (contract); both differentiable
    through plain autograd, like q."""
    b, hq, sq, d = q.shape
    hkv, dv = view.kv_heads, view.v_head_dim
    g = hq // hkv
    if sq == 0 or b == 0:
        return q.new_zeros(b, hq, sq, dv)
    acc = acc_dtype(q.dtype)
    dev = q.device
    sk = view.max_length
    qpos = query_positions(view.lengths, sq)  # (B, Sq)
    key_block = pattern.key_block(KEY_BLOCK)
    pattern, index = selection_over_cache(q, view, pattern)
    rows = visited_rows(pattern, qpos, -(-sk // key_block), key_block, batch=b, kv_heads=hkv, index=index)
    rule = pattern.token_rule()
    qa = q.to(acc).view(b, hkv, g, sq, d)
    m = torch.full((b, hkv, g, sq, 1), float("-inf"), dtype=acc, device=dev)
    l = torch.zeros((b, hkv, g, sq, 1), dtype=acc, device=dev)
    o = torch.zeros((b, hkv, g, sq, dv), dtype=acc, device=dev)
    step = _chunk(b, hq, sq)
    for c0 in range(_first_key(pattern, view, sq), sk, step):
        c1 = min(sk, c0 + step)
        kc, vc = view.gather(c0, c1)
        kpos = torch.arange(c0, c1, device=dev)
        vis = _visible(rule, qpos, kpos, view.lengths, rows, key_block)[:, :, None]  # (B, 1|Hkv, 1, Sq, n)
        s = torch.matmul(qa, kc.to(acc)[:, :, None].transpose(-1, -2)) * scale
        # a non-finite score (infinite or NaN q / k) is NaN, never a masked -inf (contract, "Bad input")
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
        s = cap_scores(s, softcap).masked_fill(~vis, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe)
        alpha = torch.exp(torch.where(torch.isfinite(m), m, m_safe) - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        o = o * alpha + torch.matmul(p, vc.to(acc)[:, :, None])
        m = m_new
    # rows that saw no key output 0; a NaN `l` (a non-finite input the row sees) stays NaN
    if sink_logits is not None:  # o / (l + e^{c - m}), rescaled to max(m, c) so nothing overflows
        c = sink_logits.to(acc).view(1, hkv, g, 1, 1)
        m_f = torch.where(torch.isfinite(m), m, c)
        top = torch.maximum(m_f, c)
        a = torch.exp(m_f - top)
        o, l = o * a, torch.where(l == 0, l, l * a + torch.exp(c - top))
    out = torch.where(l == 0, torch.zeros_like(o), o / torch.where(l == 0, torch.ones_like(l), l))
    return out.view(b, hq, sq, dv).to(q.dtype)


class ReferenceCacheChunked(Kernel):
    """Attention over a contiguous or paged cache in plain PyTorch, keys chunk by chunk through
    the cache's view: every softmax pattern, any device and float dtype, any number of query
    rows, differentiable in q. The portable path: costed so that a native decode kernel wins
    wherever one can run."""

    name = "reference.cache_chunked"
    backend = "reference"
    patterns = SOFTMAX_PATTERNS + (InfLLMv2,)
    supports_backward = True
    supports_sinks = True
    supports_softcap = True
    cache_kinds = ("contiguous", "paged")
    #: a quantized cache is dequantized chunk by chunk (`KVView.gather`)
    kv_dtypes = (None, "int8", "fp8_e4m3")

    def cost(self, p):
        lo, hi = p.pattern.key_range(p.sk - p.sq, p.sk, p.sk)
        keys = p.sk if p.pattern.sink_tokens(p.sk) else max(1, hi - lo)
        acc_elem = torch.finfo(acc_dtype(p.dtype)).bits // 8
        flops = 2.0 * (p.head_dim + p.v_head_dim) * p.batch * p.q_heads * p.sq * keys
        # K/V chunks upcast and broadcast over each group's heads: copied once per query head
        nbytes = acc_elem * p.batch * p.q_heads * keys * (p.head_dim + p.v_head_dim)
        chunks = -(-keys // _chunk(p.batch, p.q_heads, max(p.sq, 1)))
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.06,
                                overhead_s=chunks * _CHUNK_OVERHEAD_S + _SETUP_S, compute_dtype=acc_dtype(p.dtype))

    def run_cache(self, q, view, p, *, sink_logits=None):
        return cache_attention(q, view, p.pattern, scale=p.scale, softcap=p.softcap, sink_logits=sink_logits)

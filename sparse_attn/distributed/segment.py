"""The one compute primitive of context parallelism: query rows at arbitrary absolute positions
attend to a set of keys at arbitrary absolute positions, giving `(out, lse)` for a log-sum-exp
merge, and the matching flash backward.

`sparse_attn.attention` end-aligns queries to keys; a rank of a sharded sequence instead holds
query rows at its own positions (two chunks under zigzag) and sees keys arriving from other ranks
in pieces. Everything a pattern needs is positional (`Pattern.token_mask(qpos, kpos)` is written at
absolute positions, `BlockSparse` layouts and TopK blocks are indexed by them), so the primitive
evaluates the pattern at the true positions instead of moving the kernels' end-alignment around.

It is the reference backend's chunked softmax (backends/reference/softmax.py) with positions
passed in: query rows in chunks of at most `_MAX_ROWS`, each chunk touching only the keys its
pattern can reach (`Pattern.key_range` plus sinks), so the largest temporary is
`rows x reachable keys`, never `Sq x Sk`. Accumulation is float32 (float64 for float64 inputs).

The backward takes the *merged* `lse` and `delta = rowsum(dO * O)` of the full row (over every
piece), so the pieces' gradients add up to the single-process gradient.
"""
from __future__ import annotations

import bisect

import torch

from ..backends.reference.softmax import acc_dtype
from ..layout.block_layout import index_to_bool
from ..patterns import TopK

#: elements of one chunk's score matrix (B * Hq * rows * keys)
_CHUNK_ELEMS = 1 << 22
_MAX_ROWS = 256


class KeySet:
    """Absolute positions of a piece of keys: ascending disjoint `ranges`; row `i` of the piece's
    K/V is the `i`-th position of the concatenated ranges."""

    def __init__(self, ranges):
        self.ranges = list(ranges)
        self.starts = [a for a, _ in self.ranges]
        self.base = []
        n = 0
        for a, b in self.ranges:
            self.base.append(n)
            n += b - a
        self.size = n

    def index(self, p: int) -> int:
        """Number of keys of the piece at positions `< p`."""
        i = bisect.bisect_right(self.starts, p) - 1
        if i < 0:
            return 0
        a, b = self.ranges[i]
        return self.base[i] + min(p, b) - a

    def rows_for(self, lo: int, hi: int, sinks: int) -> list[tuple[int, int]]:
        """Piece rows of the keys at positions `[lo, hi)`, plus the sinks `[0, sinks)` below `lo`."""
        out = []
        s1 = self.index(min(sinks, lo))
        if s1 > 0:
            out.append((0, s1))
        a, b = self.index(lo), self.index(hi)
        if b > a:
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(b, out[-1][1]))
            else:
                out.append((a, b))
        return out


class _Rows:
    """One chunk of query rows `[r0, r1)` (local rows, contiguous positions `[p0, p0 + r1 - r0)`),
    its keys in a piece, their positions and the chunk's token mask."""

    def __init__(self, pattern, r0, r1, p0, keys: KeySet, kpos_all, total, token_index, nb):
        self.r0, self.r1 = r0, r1
        lo, hi = pattern.key_range(p0, p0 + (r1 - r0), total)
        self.rows = keys.rows_for(lo, hi, pattern.sink_tokens(total))
        self.n = sum(b - a for a, b in self.rows)
        if self.n == 0:
            return
        dev = kpos_all.device
        qpos = torch.arange(p0, p0 + (r1 - r0), device=dev)
        kpos = torch.cat([kpos_all[a:b] for a, b in self.rows]) if len(self.rows) > 1 else \
            kpos_all[self.rows[0][0]:self.rows[0][1]]
        selected = index_to_bool(token_index[:, :, r0:r1], nb) if token_index is not None else None
        mask = pattern.token_mask(qpos, kpos, selected=selected)
        self.mask = mask[None, None, None] if mask.dim() == 2 else mask[:, :, None]  # (B', H', 1, r, n)

    def take(self, x):
        """`(B, Hkv, n_piece, *)` -> this chunk's keys `(B, Hkv, 1, n, *)`."""
        if len(self.rows) == 1:
            a, b = self.rows[0]
            return x[:, :, None, a:b]
        return torch.cat([x[:, :, a:b] for a, b in self.rows], dim=2)[:, :, None]

    def add_to(self, dx, part):
        base = 0
        for a, b in self.rows:
            dx[:, :, a:b] += part[:, :, base:base + b - a]
            base += b - a


def _row_chunks(pattern, qranges, keys: KeySet, kpos, total, batch_heads, token_index, nb):
    """Chunks of local query rows; `qranges` are the absolute ranges of the rows, in row order."""
    row = 0
    for a, b in qranges:
        lo, hi = pattern.key_range(b - 1, b, total)
        reach = max(1, min(keys.size, hi - lo + pattern.sink_tokens(total)))
        step = max(1, min(_MAX_ROWS, _CHUNK_ELEMS // max(1, batch_heads * reach)))
        for p in range(a, b, step):
            q1 = min(b, p + step)
            c = _Rows(pattern, row + p - a, row + q1 - a, p, keys, kpos, total, token_index, nb)
            if c.n:
                yield c
        row += b - a


def _nb(pattern, total):
    return -(-total // pattern.block_size) if isinstance(pattern, TopK) else 0


def segment_forward(q, qranges, k, v, keys: KeySet, pattern, *, total: int, scale: float, token_index=None):
    """Attention of query rows at positions `qranges` over the keys of one piece.

    q `(B, Hq, Sq, D)`; k `(B, Hkv, n, D)`, v `(B, Hkv, n, Dv)` at positions `keys`; `total`: the
    full sequence length (a non-causal or windowed pattern needs it); `token_index`: TopK's
    per-token selection `(B, Hkv, Sq, topk)` (global block ids). Returns `(out, lse)` in the
    accumulation dtype, `out` `(B, Hq, Sq, Dv)` normalised within the piece, `lse` `(B, Hq, Sq)`
    with `-inf` for rows that see no key of the piece (their `out` is 0)."""
    b, hq, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, hkv, g, sq, dv, dtype=acc, device=q.device)
    lse = torch.full((b, hkv, g, sq), float("-inf"), dtype=acc, device=q.device)
    if keys.size == 0 or sq == 0 or b == 0:
        return out.view(b, hq, sq, dv), lse.view(b, hq, sq)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    ka, va = k.to(acc), v.to(acc)
    kpos = _positions(keys, q.device)
    for c in _row_chunks(pattern, qranges, keys, kpos, total, b * hq, token_index, _nb(pattern, total)):
        s = torch.matmul(qa[:, :, :, c.r0:c.r1], c.take(ka).transpose(-1, -2)) * scale
        s = s.masked_fill(~c.mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        seen = denom > 0
        out[:, :, :, c.r0:c.r1] = torch.matmul(p, c.take(va)) / torch.where(seen, denom, torch.ones_like(denom))
        lse[:, :, :, c.r0:c.r1] = torch.where(seen, m + torch.log(denom), torch.full_like(m, float("-inf")))[..., 0]
    return out.view(b, hq, sq, dv), lse.view(b, hq, sq)


def segment_backward(q, qranges, k, v, keys: KeySet, pattern, lse, delta, dout, *, total: int, scale: float,
                     token_index=None):
    """Gradients of one piece from the merged row statistics: `lse` `(B, Hq, Sq)` over ALL pieces
    (`+inf` for rows that see nothing anywhere) and `delta = rowsum(dO * O)` `(B, Hq, Sq)`.
    Returns `(dq, dk, dv)` in the accumulation dtype: dq `(B, Hq, Sq, D)` (this piece's share),
    dk, dv for the piece's keys."""
    b, hq, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(b, hkv, g, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dvv = torch.zeros(v.shape, dtype=acc, device=q.device)
    if keys.size == 0 or sq == 0 or b == 0:
        return dq.view(b, hq, sq, d), dk, dvv
    qa = q.to(acc).view(b, hkv, g, sq, d)
    ka, va = k.to(acc), v.to(acc)
    do = dout.to(acc).reshape(b, hkv, g, sq, dv)
    lse = lse.to(acc).reshape(b, hkv, g, sq)
    delta = delta.to(acc).reshape(b, hkv, g, sq)
    kpos = _positions(keys, q.device)
    for c in _row_chunks(pattern, qranges, keys, kpos, total, b * hq, token_index, _nb(pattern, total)):
        qc, doc = qa[:, :, :, c.r0:c.r1], do[:, :, :, c.r0:c.r1]
        kc, vc = c.take(ka), c.take(va)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        s = s.masked_fill(~c.mask, float("-inf"))
        p = torch.exp(s - lse[:, :, :, c.r0:c.r1, None])
        c.add_to(dvv, torch.matmul(p.transpose(-1, -2), doc).sum(dim=2))
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        ds = p * (dp - delta[:, :, :, c.r0:c.r1, None])
        dq[:, :, :, c.r0:c.r1] += torch.matmul(ds, kc) * scale
        c.add_to(dk, torch.matmul(ds.transpose(-1, -2), qc).sum(dim=2) * scale)
    return dq.view(b, hq, sq, d), dk, dvv


def _positions(keys: KeySet, device):
    if not keys.ranges:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, b, device=device) for a, b in keys.ranges])


def merge(out, lse, out2, lse2):
    """Log-sum-exp merge of two partial results (`-inf` lse: no key). Returns `(out, lse)`."""
    new = torch.logaddexp(lse, lse2)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w1 = torch.where(torch.isfinite(lse), torch.exp(lse - safe), torch.zeros_like(lse))
    w2 = torch.where(torch.isfinite(lse2), torch.exp(lse2 - safe), torch.zeros_like(lse2))
    return out * w1[..., None] + out2 * w2[..., None], new

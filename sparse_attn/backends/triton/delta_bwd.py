"""The backward of the Triton chunked delta rule: the chain through the chunk terms in PyTorch,
the sequential part in Triton.

The forward's result depends on the inputs only through the per-chunk terms `W_v, W, QD, P, KE`
and the chunk decays `CD` (delta_kernels.py's notation; reference/delta.py `_chunk_terms` forms
them for all chunks at once). So the backward is
1. the states entering each chunk, recomputed by the Triton forward (`states=` buffer);
2. the gradients of those terms: one reverse walk over the chunks per (value head, Dv tile)
   (`delta_bwd_scan_kernel`), the only sequential part;
3. the gradients of q, k, v, beta, decay from the terms' gradients: PyTorch autograd through
   `_chunk_terms`, batched over every chunk (per-channel decays in groups of chunks, whose
   `(C, C, D)` weights are bounded in memory as in the reference).
The initial state's gradient comes out of step 2. Inputs are padded to whole chunks with tokens of
`beta = 0` and `g = 0`, which change neither the outputs nor the state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.delta import _PER_CHANNEL_GROUP, G_FLOOR, _by_kv_head, _chunk_terms
from . import delta as _fwd


def _pad_tokens(x, pad, dim):
    if not pad:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
    return F.pad(x, spec)


def _flat(t, b, hv, n, c):
    """A chunk term `(B, Hk, G or 1, n, C, X)` -> contiguous float32 `(B * Hv, n * C, X)`."""
    hk = t.shape[1]
    return t.expand(b, hk, hv // hk, *t.shape[3:]).reshape(b * hv, n * c, t.shape[-1]).float().contiguous()


def _unflat(x, like):
    """The inverse of `_flat` for a gradient, summed over G where the term was shared by a group."""
    b, hk = like.shape[:2]
    x = x.reshape(b, hk, -1, *like.shape[3:])
    return x.sum(2, keepdim=True) if like.shape[2] == 1 else x


def _bwd_launch(q, bd, ws, prec):
    """(matmul precision, warps) of the reverse walk: it holds three more (C, D) tiles and R beside
    the state, so on a GPU it takes twice the scan's warps (with the scan's, it spilled 8 bytes at
    D = 64). At D = 128 it spilled whatever the warps (16 cap a thread at 128 registers) or the
    precision (tf32 too): the kernel class refuses gradients there (MAX_BWD_HEAD_DIM)."""
    return (prec, 2 * ws) if _fwd.on_gpu(q) else (prec, ws)


class TritonDeltaFunction(torch.autograd.Function):
    """q, k float32 `(B, Hk, S, D)` (already normalised when qk_l2norm); v `(B, Hv, S, Dv)`; beta
    `(B, Hv, S)`; g None or the decays `(B, Hv, S[, D])`; s0 None or `(B, Hv, D, Dv)`."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale):
        o, st = _fwd.triton_delta_chunked(q, k, v, beta, decay=g, scale=scale, initial_state=s0)
        ctx.save_for_backward(q, k, v, beta, g, s0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, st

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, beta, g, s0 = ctx.saved_tensors
        scale = ctx.scale
        b, hk, s, d = q.shape
        hv, dv = v.shape[1], v.shape[3]
        c = _fwd.CHUNK
        n = -(-s // c)
        pad = n * c - s
        dev, f32 = q.device, torch.float32
        qp, kp = (_pad_tokens(x.detach().to(f32), pad, 2) for x in (q, k))
        vp = _pad_tokens(v.detach().to(f32), pad, 2)
        bp = _pad_tokens(beta.detach().to(f32), pad, 2)
        gp = None if g is None else _pad_tokens(g.detach().to(f32).clamp(min=G_FLOOR), pad, 2)
        per_channel = g is not None and g.dim() == 4
        kind = 0 if g is None else (2 if per_channel else 1)

        states = torch.empty(b * hv, n, d, dv, dtype=f32, device=dev)
        _fwd.triton_delta_chunked(qp, kp, vp, bp, decay=gp, scale=scale, initial_state=s0, states=states)

        def chunks(x, grouped):  # (B, H, S', X) -> (B, Hk, G or 1, n, C, X)
            x = _by_kv_head(x, hk) if grouped else x[:, :, None]
            return x.reshape(*x.shape[:3], n, c, *x.shape[4:])

        qc, kc, vc = chunks(qp, False), chunks(kp, False), chunks(vp, True)
        bc = _by_kv_head(bp, hk).reshape(b, hk, hv // hk, n, c)
        gc = None
        if gp is not None:
            gg = _by_kv_head(gp.to(torch.float64), hk)
            gc = gg.reshape(b, hk, hv // hk, n, c, *gg.shape[4:])
        dop = (torch.zeros(b * hv, n * c, dv, dtype=f32, device=dev) if do is None
               else _pad_tokens(do.to(f32), pad, 2).reshape(b * hv, n * c, dv).contiguous())

        # the terms of every chunk (forward values for step 2; their gradients are taken per group)
        m = n if not per_channel else max(1, _PER_CHANNEL_GROUP // max(1, b * hv * c * c * d))
        grads = {name: torch.zeros_like(x) for name, x in (("q", qc), ("k", kc), ("v", vc), ("beta", bc))}
        if gc is not None:
            grads["g"] = torch.zeros_like(gc)
        flat = {name: [] for name in ("wv", "w", "qd", "p", "ke", "cd")}
        groups = []
        for i0 in range(0, n, m):
            sl = slice(i0, min(n, i0 + m))
            leaves = {"q": qc[:, :, :, sl], "k": kc[:, :, :, sl], "v": vc[:, :, :, sl], "beta": bc[:, :, :, sl]}
            if gc is not None:
                leaves["g"] = gc[:, :, :, sl]
            leaves = {nm: x.detach().requires_grad_() for nm, x in leaves.items()}
            with torch.enable_grad():
                terms = _chunk_terms(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"), f32)
            groups.append((sl, leaves, terms))
        nn = lambda t: t.shape[3]  # noqa: E731  (chunks in a group)
        for sl, _, (wv, w, qd, p, ke, cd) in groups:
            g_n = nn(wv)
            for name, t in (("wv", wv), ("w", w), ("qd", qd), ("ke", ke)):
                flat[name].append(_flat(t.detach(), b, hv, g_n, c).reshape(b * hv, g_n, c, -1))
            flat["p"].append(_flat(p.detach(), b, hv, g_n, c).reshape(b * hv, g_n, c, c))
            if cd is not None:
                cdf = cd.detach().float()
                flat["cd"].append(cdf.expand(b, hk, hv // hk, *cdf.shape[3:]).reshape(b * hv, g_n, *cdf.shape[4:]))
        wv_, w_, qd_, ke_ = (torch.cat(flat[x], 1).reshape(b * hv, n * c, -1).contiguous() for x in ("wv", "w", "qd", "ke"))
        p_ = torch.cat(flat["p"], 1).reshape(b * hv, n * c, c).contiguous()
        cd_ = torch.cat(flat["cd"], 1).contiguous() if kind else None

        # step 2: the reverse walk
        c_, bd, bdv, bv, bk, prec, wp, ws, ns = _fwd._meta(q, d, dv, kind)
        bprec, bwarps = _bwd_launch(q, bd, ws, prec)
        nv = -(-dv // bv)
        nbh = b * hv
        part_d = torch.empty(3, nv, nbh, n * c, d, dtype=f32, device=dev)
        dwv = torch.empty(nbh, n * c, dv, dtype=f32, device=dev)
        dp = torch.empty(nv, nbh, n * c, c, dtype=f32, device=dev)
        dcd = torch.empty(nv, nbh, n, *((d,) if kind == 2 else ()), dtype=f32, device=dev)
        ds0 = torch.empty(nbh, d, dv, dtype=f32, device=dev)
        dsfc = None if dsf is None else dsf.to(f32).reshape(nbh, d, dv).contiguous()
        _fwd._k.delta_bwd_scan_kernel[(nbh, nv)](
            qd_, ke_, w_, wv_, p_, cd_ if cd_ is not None else p_, states, dop,
            dsfc if dsfc is not None else ds0, part_d[0], part_d[1], part_d[2], dwv, dp, dcd, ds0, float(scale),
            n * c, d, dv, nbh, DECAY=kind, HAS_DSF=dsfc is not None, C=c, BD=bd, BV=bv, PREC=bprec,
            num_warps=bwarps, **({} if ns is None else {"num_stages": ns}))
        dw, dqd, dke = part_d.sum(1).unbind(0)
        dp = dp.sum(0)
        dcd = dcd.sum(0)

        # step 3: through the chunk terms, group by group
        off = 0
        for sl, leaves, terms in groups:
            g_n = nn(terms[0])
            rows = slice(off * c, (off + g_n) * c)
            wv, w, qd, p, ke, cd = terms
            outs, gouts = [wv, w, p], [_unflat(dwv[:, rows], wv), _unflat(dw[:, rows], w), _unflat(dp[:, rows], p)]
            for t, gt in ((qd, dqd), (ke, dke)):
                outs.append(t)
                gouts.append(_unflat(gt[:, rows], t))
            if cd is not None:
                outs.append(cd)
                gouts.append(dcd[:, off:off + g_n].reshape(cd.shape[0], cd.shape[1], -1, *cd.shape[3:])
                             .to(cd.dtype))
            names = list(leaves)
            res = torch.autograd.grad(outs, [leaves[x] for x in names], gouts, allow_unused=True)
            for nm, gr in zip(names, res):
                if gr is not None:
                    grads[nm][:, :, :, sl] += gr
            off += g_n

        def tokens(x):  # (B, Hk, G or 1, n, C, ...) -> (B, H, S, ...)
            x = x.reshape(x.shape[0], x.shape[1] * x.shape[2], n * c, *x.shape[5:])
            return x[:, :, :s]

        dq = tokens(grads["q"]).to(q.dtype)
        dk = tokens(grads["k"]).to(k.dtype)
        dv_ = tokens(grads["v"]).to(v.dtype)
        dbeta = tokens(grads["beta"][..., None])[..., 0].to(beta.dtype)
        dg = None
        if g is not None:
            gr = grads["g"]
            dg = (tokens(gr) if per_channel else tokens(gr[..., None])[..., 0]).to(g.dtype)
            dg = dg.masked_fill(g < G_FLOOR, 0.0)  # the clamp
        ds0_ = None if s0 is None else ds0.reshape(b, hv, d, dv).to(s0.dtype)
        return dq, dk, dv_, dbeta, dg, ds0_, None

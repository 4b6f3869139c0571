"""Fused `WindowLinear` in Triton, forward and backward: the window softmax and the linear memory
of the evicted keys in one pass each (contract: `o = s * A + (1 - s) * L`, `s = sigmoid(gate)`).

Forward: one program per (batch * query head, 64-column Dv tile) walks the queries in tiles of `C`:
- softmax part: an online softmax over the sink keys left of the window and the key tiles of the
  window `[p_lo - window + 1, p_hi]` (mask `j <= p` and `p - j < window or j < sinks`);
- linear part: `(M, z)` in float32 registers hold the evicted keys `sinks <= j <= p_lo - window`;
  the `C` keys `p_lo - window < j <= p_lo + C - window` that leave the window inside the tile enter
  under the shifted causal mask `j <= p - window` and are then added to `(M, z)`.

Backward (no atomics, deterministic), with `phi = elu + 1`, `w_tj = phi(q_t).phi(k_j)` over the
evicted keys `E_t` of query `t`, `den_t = sum_j w_tj`, and `dO` the output gradient:
- `g_num_t = (1 - s) dO_t / den_t`, `g_den_t = -(1 - s) (dO_t . L_t) / den_t` (0 when `den_t = 0`),
  so `d w_tj = g_num_t . v_j + g_den_t`;
- linear dq: `dphi(q_t) * (M_t g_num_t + g_den_t z_t)` (forward running state over queries);
- linear dk/dv: with `R_j = sum_{t: p_t >= j + window} phi(q_t) g_num_t^T` and `r_j` the same sum of
  `g_den_t phi(q_t)` (a reverse running state over queries, summed over the GQA group),
  `dv_j = R_j^T phi(k_j)`, `dk_j = dphi(k_j) * (R_j v_j + r_j)` for `j >= sinks`;
- softmax part: the flash backward with `dO_A = s dO`, `dS = s P (dO v^T - dO . A)`;
- `d gate = s (1 - s) sum_t dO_t . (A_t - L_t)`.
Three launches: the forward kernel again in "prep" mode (per row `lse`, `den` and `dO . L`), one
program per (batch * query head) for dq (it also writes `dO . A`, taken as `sum_j P dp` over the
same `dp` it uses, so the softmax part of a row with one visible key gets exactly zero gradient),
and one per (batch * kv head) for dk/dv (key tiles walked from the end; the softmax part visits
the queries that see each key tile; the group's heads are summed in registers). Extra memory:
float32 row vectors `(B, Hq, Sq)` and the `(D, Dv)` states in registers; nothing of size Sq x Sk.
"""
from __future__ import annotations

import torch

from ...patterns import WindowLinear
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.registry import register
from .runtime import TritonKernelMixin, on_gpu

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - no Triton
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if triton is not None:
    @triton.jit
    def _phi(x):
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _dphi(x):
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _softmax_tile(q, K, V, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask, m_i, l_i, acc,
                      scale, SK, D, DV, WINDOW, SINKS, LIMIT, PREC: tl.constexpr):
        kj = j0 + offs_c
        kmask = (kj < SK) & (kj < LIMIT)
        k = tl.load(K + kj[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kj[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PREC) * scale
        s = tl.where(tl.abs(s) < float("inf"), s, float("nan"))  # non-finite q / k: NaN, never a masked -inf
        vis = (kj[None, :] <= pos[:, None]) & ((pos[:, None] - kj[None, :] < WINDOW) | (kj[None, :] < SINKS))
        vis = vis & kmask[None, :] & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def window_linear_fwd_kernel(Q, K, V, GATE, O, DO, LSE, DEN, DL, scale, SQ, SK, D, DV, HQ, G, WINDOW,
                                 SINKS, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                                 PREP: tl.constexpr):
        """PREP=False: writes O. PREP=True (backward): writes, per row, `lse` and `den` (Dv tile 0)
        and this Dv tile's share of `dO . L` (summed over the tiles by the launcher)."""
        pid = tl.program_id(0)
        iv = tl.program_id(1)
        b = pid // HQ
        hq = pid % HQ
        hkv_all = HQ // G
        kvh = b * hkv_all + hq // G
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, BD)
        offs_v = iv * BV + tl.arange(0, BV)
        dmask = offs_d < D
        vmask = offs_v < DV
        Kb = K + kvh * SK * D
        Vb = V + kvh * SK * DV
        off = SK - SQ
        gl = tl.load(GATE + hq).to(tl.float32)
        gw = 1.0 / (1.0 + tl.exp(-gl))
        mem = tl.zeros([BD, BV], dtype=tl.float32)
        z = tl.zeros([BD], dtype=tl.float32)
        e0 = tl.maximum(SINKS, off - WINDOW + 1)  # keys [SINKS, e0) are evicted before the first query
        for j0 in range(SINKS, e0, C):
            kj = j0 + offs_c
            km = kj < e0
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=km[:, None] & vmask[None, :], other=0.0)
            fk = tl.where(km[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
            mem += tl.dot(tl.trans(fk), v.to(tl.float32), input_precision=PREC)
            z += tl.sum(fk, axis=0)
        for t0 in range(0, SQ, C):
            rows = t0 + offs_c
            rmask = rows < SQ
            pos = off + rows
            q = tl.load(Q + pid * SQ * D + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            p_lo = off + t0
            p_hi = tl.minimum(off + t0 + C, SK) - 1
            lo = tl.maximum(0, p_lo - WINDOW + 1)
            m_i = tl.full([C], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([C], dtype=tl.float32)
            acc = tl.zeros([C, BV], dtype=tl.float32)
            sink_end = tl.minimum(SINKS, lo)
            for j0 in range(0, sink_end, C):  # sinks left of the window
                m_i, l_i, acc = _softmax_tile(q, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask,
                                              m_i, l_i, acc, scale, SK, D, DV, WINDOW, SINKS, sink_end, PREC)
            for j0 in range(lo, p_hi + 1, C):  # the window
                m_i, l_i, acc = _softmax_tile(q, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask,
                                              m_i, l_i, acc, scale, SK, D, DV, WINDOW, SINKS, SK, PREC)
            a = acc / tl.where(l_i != 0, l_i, 1.0)[:, None]  # NaN l (non-finite input seen) stays NaN
            # linear memory: the stored (M, z), then the keys that leave the window inside this tile
            fq = tl.where(dmask[None, :], _phi(q), 0.0)
            num = tl.dot(fq, mem, input_precision=PREC)
            den = tl.sum(fq * z[None, :], axis=1)
            kj = p_lo - WINDOW + 1 + offs_c
            kv = (kj >= SINKS) & (kj >= 0) & (kj < SK)
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=kv[:, None] & dmask[None, :], other=0.0)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=kv[:, None] & vmask[None, :],
                        other=0.0).to(tl.float32)
            fk = tl.where(kv[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
            wmask = (kj[None, :] <= pos[:, None] - WINDOW) & kv[None, :]
            w = tl.where(wmask, tl.dot(fq, tl.trans(fk), input_precision=PREC), 0.0)
            num += tl.dot(w, v, input_precision=PREC)
            den += tl.sum(w, axis=1)
            mem += tl.dot(tl.trans(fk), v, input_precision=PREC)
            z += tl.sum(fk, axis=0)
            # den == 0 only with no evicted key (phi > 0); a NaN den (NaN key in the memory) stays NaN
            lin = tl.where(den[:, None] == 0, 0.0, num / tl.where(den == 0, 1.0, den)[:, None])
            if PREP:
                do = tl.load(DO + pid * SQ * DV + rows[:, None] * DV + offs_v[None, :],
                             mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
                part = (iv * tl.num_programs(0) + pid) * SQ + rows
                tl.store(DL + part, tl.sum(do * lin, axis=1), mask=rmask)
                lse = tl.where(l_i != 0, m_i + tl.log(tl.where(l_i != 0, l_i, 1.0)), float("inf"))
                first = rmask & ((rows * 0 + iv) == 0)  # Dv tile 0 writes the per-row values
                tl.store(LSE + pid * SQ + rows, lse, mask=first)
                tl.store(DEN + pid * SQ + rows, den, mask=first)
            else:
                o = gw * a + (1.0 - gw) * lin
                tl.store(O + pid * SQ * DV + rows[:, None] * DV + offs_v[None, :], o.to(O.dtype.element_ty),
                         mask=rmask[:, None] & vmask[None, :])

    @triton.jit
    def _dq_softmax_tile(q, do, lse, da, dq, K, V, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask,
                         scale, gw, SK, D, DV, WINDOW, SINKS, LIMIT, PREC: tl.constexpr, DELTA: tl.constexpr):
        """DELTA: returns `da + sum_j P dp` (the row's `dO . A` from the same `dp` the second pass
        uses, so `sum_j dS = 0` up to one rounding: a row with one visible key gets dS = 0 exactly);
        else `dq + dS k`."""
        kj = j0 + offs_c
        kmask = (kj < SK) & (kj < LIMIT)
        k = tl.load(K + kj[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        v = tl.load(V + kj[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :],
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        vis = (kj[None, :] <= pos[:, None]) & ((pos[:, None] - kj[None, :] < WINDOW) | (kj[None, :] < SINKS))
        vis = vis & kmask[None, :] & rmask[:, None]
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        # one return of one type per specialisation: compiled Triton rejects two returns of
        # different shapes even behind a constexpr `if` (the interpreter accepts them)
        if DELTA:
            res = da + tl.sum(p * dp, axis=1)
        else:
            ds = gw * p * (dp - da[:, None])
            res = dq + tl.dot(ds, k, input_precision=PREC)
        return res

    @triton.jit
    def window_linear_bwd_dq_kernel(Q, K, V, GATE, DO, LSE, DEN, DA, DL, DQ, scale, SQ, SK, D, DV, HQ, G, WINDOW,
                                    SINKS, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                                    PREC: tl.constexpr, PART: tl.constexpr):
        """One program per (batch * query head): dq of the softmax part over the sink and window key
        tiles, plus the linear part from the running `(M, z)` (all of Dv in registers).
        `PART`: 0 both (grid (B * Hq, 1)); 1 the softmax part only, to a float32 DQ; 2 the linear part
        only, one program per (batch * query head, Dv tile of BDV columns), each writing its partial dq
        to slot `program_id(1)` of DQ (`_linear_tile`: where one program holding both spilled)."""
        pid = tl.program_id(0)
        b = pid // HQ
        hq = pid % HQ
        kvh = b * (HQ // G) + hq // G
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, BD)
        offs_v = tl.program_id(1) * BDV + tl.arange(0, BDV)  # PART 2: one Dv tile per program
        dmask = offs_d < D
        vmask = offs_v < DV
        Kb = K + kvh * SK * D
        Vb = V + kvh * SK * DV
        off = SK - SQ
        gw = 1.0 / (1.0 + tl.exp(-tl.load(GATE + hq).to(tl.float32)))
        mem = tl.zeros([BD, BDV], dtype=tl.float32)
        z = tl.zeros([BD], dtype=tl.float32)
        e0 = tl.maximum(SINKS, off - WINDOW + 1)
        if PART == 1:
            e0 = SINKS  # no linear part: no state to build
        for j0 in range(SINKS, e0, C):
            kj = j0 + offs_c
            km = kj < e0
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=km[:, None] & vmask[None, :], other=0.0)
            fk = tl.where(km[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
            mem += tl.dot(tl.trans(fk), v.to(tl.float32), input_precision=PREC)
            z += tl.sum(fk, axis=0)
        for t0 in range(0, SQ, C):
            rows = t0 + offs_c
            rmask = rows < SQ
            pos = off + rows
            q = tl.load(Q + pid * SQ * D + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            do = tl.load(DO + pid * SQ * DV + rows[:, None] * DV + offs_v[None, :],
                         mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            lse = tl.load(LSE + pid * SQ + rows, mask=rmask, other=0.0)
            dl = tl.load(DL + pid * SQ + rows, mask=rmask, other=0.0)
            den = tl.load(DEN + pid * SQ + rows, mask=rmask, other=0.0)
            p_lo = off + t0
            p_hi = tl.minimum(off + t0 + C, SK) - 1
            lo = tl.maximum(0, p_lo - WINDOW + 1)
            sink_end = tl.minimum(SINKS, lo)
            # PART 2 writes its Dv tile's partial dq to its own slot
            dq_ptr = DQ + (tl.program_id(1) * tl.num_programs(0) + pid) * SQ * D + rows[:, None] * D + offs_d[None, :]
            if PART == 2:  # a partial sum over this Dv tile, summed by the launcher
                dq = tl.zeros([C, BD], dtype=tl.float32)
            else:
                dq = tl.zeros([C, BD], dtype=tl.float32)
                da = tl.zeros([C], dtype=tl.float32)
                for j0 in range(0, sink_end, C):  # pass 1: da = dO . A
                    da = _dq_softmax_tile(q, do, lse, da, dq, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask,
                                          offs_v, vmask, scale, gw, SK, D, DV, WINDOW, SINKS, sink_end, PREC, True)
                for j0 in range(lo, p_hi + 1, C):
                    da = _dq_softmax_tile(q, do, lse, da, dq, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask,
                                          offs_v, vmask, scale, gw, SK, D, DV, WINDOW, SINKS, SK, PREC, True)
                tl.store(DA + pid * SQ + rows, da, mask=rmask)  # for the dk/dv pass and d(gate)
                for j0 in range(0, sink_end, C):  # pass 2: dS = s P (dp - da), dq = scale dS k
                    dq = _dq_softmax_tile(q, do, lse, da, dq, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask,
                                          offs_v, vmask, scale, gw, SK, D, DV, WINDOW, SINKS, sink_end, PREC, False)
                for j0 in range(lo, p_hi + 1, C):
                    dq = _dq_softmax_tile(q, do, lse, da, dq, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask,
                                          offs_v, vmask, scale, gw, SK, D, DV, WINDOW, SINKS, SK, PREC, False)
                dq = dq * scale
            if PART != 1:
                kj, kv, v, fk = _leaving_keys(Kb, Vb, p_lo, offs_c, offs_d, dmask, offs_v, vmask, SK, D, DV, WINDOW,
                                              SINKS)
                dq = _dq_linear(q, do, dl, den, mem, z, dq, kj, kv, v, fk, pos, gw, tl.program_id(1) == 0, WINDOW,
                                PREC)
                mem += tl.dot(tl.trans(fk), v, input_precision=PREC)
                z += tl.sum(fk, axis=0)
            tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _leaving_keys(Kb, Vb, p_lo, offs_c, offs_d, dmask, offs_v, vmask, SK, D, DV, WINDOW, SINKS):
        """The keys that leave the window inside the query tile starting at `p_lo`: their positions,
        validity, float32 values (this program's Dv columns) and phi(k), zero where invalid."""
        kj = p_lo - WINDOW + 1 + offs_c
        kv = (kj >= SINKS) & (kj >= 0) & (kj < SK)
        k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=kv[:, None] & dmask[None, :], other=0.0)
        v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=kv[:, None] & vmask[None, :],
                    other=0.0).to(tl.float32)
        fk = tl.where(kv[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
        return kj, kv, v, fk

    @triton.jit
    def _dq_linear(q, do, dl, den, mem, z, dq, kj, kv, v, fk, pos, gw, first, WINDOW, PREC: tl.constexpr):
        """dq += the linear part: d phi(q_t) = M_t g_num_t + g_den_t z_t, M_t = the state (keys evicted
        before this tile) + the keys leaving the window inside it (`_leaving_keys`). Over one Dv tile
        (`mem`'s and `v`'s columns) every term is a partial sum over Dv except the g_den ones: only the
        `first` tile adds them."""
        inv = tl.where(den != 0, 1.0 / tl.where(den != 0, den, 1.0), 0.0)
        gnum = ((1.0 - gw) * inv)[:, None] * do
        gden = tl.where(first, -(1.0 - gw) * dl * inv, 0.0)
        gfq = tl.dot(gnum, tl.trans(mem), input_precision=PREC) + gden[:, None] * z[None, :]
        wmask = (kj[None, :] <= pos[:, None] - WINDOW) & kv[None, :]
        gw_tj = tl.where(wmask, tl.dot(gnum, tl.trans(v), input_precision=PREC) + gden[:, None], 0.0)
        gfq += tl.dot(gw_tj, fk, input_precision=PREC)
        return dq + _dphi(q) * gfq

    @triton.jit
    def window_linear_bwd_dkdv_kernel(Q, K, V, GATE, DO, LSE, DEN, DA, DL, DK, DVO, scale, SQ, SK, D, DV, HQ, G,
                                      WINDOW, SINKS, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                                      PREC: tl.constexpr, PART: tl.constexpr):
        """One program per (batch * kv head), key tiles from the last: the softmax part over the
        queries that see the tile (every later query for a tile with sinks), and the linear part
        from the reverse state `(R, r)` over the queries at `p >= j + window`, both summed over
        the group's query heads. `PART` as in the dq kernel (1: float32 DK / DVO; 2: per Dv tile,
        partial dk to its slot of DK, the tile's columns of DVO added to)."""
        pid = tl.program_id(0)
        hkv_all = HQ // G
        b = pid // hkv_all
        hkv = pid % hkv_all
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, BD)
        offs_v = tl.program_id(1) * BDV + tl.arange(0, BDV)  # PART 2: one Dv tile per program
        dmask = offs_d < D
        vmask = offs_v < DV
        Kb = K + pid * SK * D
        Vb = V + pid * SK * DV
        off = SK - SQ
        rst = tl.zeros([BD, BDV], dtype=tl.float32)
        r = tl.zeros([BD], dtype=tl.float32)
        n_tiles = tl.cdiv(SK, C)
        for it in range(0, n_tiles):
            j0 = (n_tiles - 1 - it) * C
            kj = j0 + offs_c
            kmask = kj < SK
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :],
                        other=0.0).to(tl.float32)
            dk_ptr = DK + (tl.program_id(1) * tl.num_programs(0) + pid) * SK * D + kj[:, None] * D + offs_d[None, :]
            dv_ptr = DVO + pid * SK * DV + kj[:, None] * DV + offs_v[None, :]
            dk = tl.zeros([C, BD], dtype=tl.float32)
            dv = tl.zeros([C, BDV], dtype=tl.float32)
            # softmax part: query positions [j0, j1 - 2 + window], or all after j0 if the tile has sinks
            j1 = tl.minimum(j0 + C, SK)
            row_lo = tl.maximum(0, j0 - off)
            row_hi = tl.where(j0 < SINKS, SQ, tl.minimum(SQ, j1 + WINDOW - 1 - off))
            if PART == 2:
                row_hi = row_lo  # the softmax part came from the first launch
            for hh in range(0, G):
                qh = b * HQ + hkv * G + hh
                gw = 1.0 / (1.0 + tl.exp(-tl.load(GATE + hkv * G + hh).to(tl.float32)))
                for r0 in range(row_lo, row_hi, C):
                    rows = r0 + offs_c
                    rmask = rows < SQ
                    pos = off + rows
                    q = tl.load(Q + qh * SQ * D + rows[:, None] * D + offs_d[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    do = tl.load(DO + qh * SQ * DV + rows[:, None] * DV + offs_v[None, :],
                                 mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
                    lse = tl.load(LSE + qh * SQ + rows, mask=rmask, other=0.0)
                    da = tl.load(DA + qh * SQ + rows, mask=rmask, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
                    vis = (kj[None, :] <= pos[:, None]) & (
                        (pos[:, None] - kj[None, :] < WINDOW) | (kj[None, :] < SINKS))
                    vis = vis & kmask[None, :] & rmask[:, None]
                    p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
                    dv += gw * tl.dot(tl.trans(p), do, input_precision=PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    ds = gw * p * (dp - da[:, None])
                    dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
            dk = dk * scale
            if PART == 2:  # dk: a partial sum over this Dv tile (its own slot); dv: this tile's columns
                dv = tl.load(dv_ptr, mask=kmask[:, None] & vmask[None, :], other=0.0)
            if PART != 1:
                dk, dv, rst, r = _dkdv_linear(Q, DO, DEN, DL, GATE, k, v, dk, dv, rst, r, kj, kmask, j0, off, b, hkv,
                                              offs_c, offs_d, dmask, offs_v, vmask, tl.program_id(1) == 0, SQ, D, DV,
                                              HQ, G, WINDOW, SINKS, PREC)
            tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=kmask[:, None] & dmask[None, :])
            tl.store(dv_ptr, dv.to(DVO.dtype.element_ty), mask=kmask[:, None] & vmask[None, :])

    @triton.jit
    def _dkdv_linear(Q, DO, DEN, DL, GATE, k, v, dk, dv, rst, r, kj, kmask, j0, off, b, hkv, offs_c, offs_d, dmask,
                     offs_v, vmask, first, SQ, D, DV, HQ, G, WINDOW, SINKS, PREC: tl.constexpr):
        """The linear part of one key tile: (dk, dv) plus what the reverse state `(R, r)` gives, and
        `(R, r)` after the tile's queries. Over one Dv tile (`offs_v`, `R`'s columns) dv is exact and dk a
        partial sum; the g_den terms (`r`) belong to the `first` tile only."""
        # linear part: the state holds the queries at p >= j0 + C + window (they see every key
        # of the tile evicted); the C queries p = j0 + window + c see a prefix of it
        lin = kmask & (kj >= SINKS)
        fk = tl.where(lin[:, None] & dmask[None, :], _phi(k), 0.0)
        dv += tl.dot(fk, rst, input_precision=PREC)
        gfk = tl.dot(v, tl.trans(rst), input_precision=PREC) + tl.where(first, r, 0.0)[None, :]
        prow = j0 + WINDOW + offs_c
        rows = prow - off
        rvalid = (rows >= 0) & (rows < SQ)
        for hh in range(0, G):
            qh = b * HQ + hkv * G + hh
            gw = 1.0 / (1.0 + tl.exp(-tl.load(GATE + hkv * G + hh).to(tl.float32)))
            q = tl.load(Q + qh * SQ * D + rows[:, None] * D + offs_d[None, :],
                        mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            do = tl.load(DO + qh * SQ * DV + rows[:, None] * DV + offs_v[None, :],
                         mask=rvalid[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            dl = tl.load(DL + qh * SQ + rows, mask=rvalid, other=0.0)
            den = tl.load(DEN + qh * SQ + rows, mask=rvalid, other=0.0)
            fq = tl.where(rvalid[:, None] & dmask[None, :], _phi(q), 0.0)
            inv = tl.where(den != 0, 1.0 / tl.where(den != 0, den, 1.0), 0.0)
            gnum = ((1.0 - gw) * inv)[:, None] * do
            gden = tl.where(first, -(1.0 - gw) * dl * inv, 0.0)
            wm = (prow[:, None] >= kj[None, :] + WINDOW) & rvalid[:, None] & lin[None, :]
            w = tl.where(wm, tl.dot(fq, tl.trans(fk), input_precision=PREC), 0.0)
            dv += tl.dot(tl.trans(w), gnum, input_precision=PREC)
            gm = tl.where(wm, tl.dot(gnum, tl.trans(v), input_precision=PREC) + gden[:, None], 0.0)
            gfk += tl.dot(tl.trans(gm), fq, input_precision=PREC)
            rst += tl.dot(tl.trans(fq), gnum, input_precision=PREC)
            r += tl.sum(gden[:, None] * fq, axis=0)
        dk += tl.where(lin[:, None], _dphi(k) * gfk, 0.0)
        return dk, dv, rst, r


def _chunk(q, bd: int) -> int:
    """Query / key tile of the forward: 64 on GPUs up to D=64, 16 above (32 spilled at D=128,
    gpu_static); 32 in the interpreter (keeps the tests' odd lengths multi-tile)."""
    if not on_gpu(q):
        return 32
    return 64 if bd <= 64 else 16


def _bv(q, bd: int, dv: int) -> int:
    """Dv columns per forward program: 32 on GPUs above D=64 (64 spilled at D=128, gpu_static)."""
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    return min(bv, 16) if on_gpu(q) and bd > 64 else bv


def _warps(bd: int, bdv: int) -> int:
    """8 warps above D=64: with 4 the forward spilled 728-848 bytes per thread at D=128
    (bench/gpu_static.py, sm_80 and sm_90): its float32 (D, Dv-tile) state and q / k / v tiles."""
    return 8 if max(bd, bdv) > 64 else 4


def _bwd_warps(bd: int, bdv: int) -> int:
    """The backward kernels hold whole float32 (D, Dv) states: 8 warps above D=64 (with 4 they
    spilled 1-2 KB per thread at D=128, bench/gpu_static.py on sm_80 and sm_90)."""
    return 8 if max(bd, bdv) > 64 else 4


def _linear_tile(q, bd: int, bdv: int):
    """Dv columns per program of the backward's linear part, or None for one launch of each kernel
    holding the softmax part and the whole float32 (D, Dv) state. On the GPU above D=64 that
    spilled 360-664 bytes at D=128 (bench/gpu_static.py), so the softmax part runs alone and the
    linear part per 32-column Dv tile (partial dq / dk summed here): more launches and re-reads,
    never timed on a GPU."""
    return min(16, bdv) if on_gpu(q) and max(bd, bdv) > 64 else None


def _prec(dtype) -> str:
    # bfloat16 values are exact in TF32; float16 / float32 keep IEEE float32 products
    return "tf32" if dtype == torch.bfloat16 else "ieee"


def triton_window_linear(q, k, v, pattern: WindowLinear, *, scale: float, gate: torch.Tensor) -> torch.Tensor:
    """Forward: q `(B, Hq, Sq, D)`, k `(B, Hkv, Sk, D)`, v `(B, Hkv, Sk, Dv)`, gate `(Hq,)` logits
    -> `(B, Hq, Sq, Dv)` in q's dtype."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bd = max(16, triton.next_power_of_2(d))
    bv = _bv(q, bd, dv)
    c = _chunk(q, bd)
    window_linear_fwd_kernel[(b * hq, triton.cdiv(dv, bv))](
        q.contiguous(), k.contiguous(), v.contiguous(), gate.contiguous(), out, out, out, out, out, float(scale),
        sq, sk, d, dv, hq, hq // hkv, pattern.window, pattern.sinks, C=c, BD=bd, BV=bv, PREC=_prec(q.dtype),
        PREP=False, num_warps=_warps(bd, bd))
    return out


def triton_window_linear_backward(q, k, v, gate, dout, pattern: WindowLinear, *, scale: float):
    """`(dq, dk, dv, dgate)` of `triton_window_linear` for the output gradient `dout` `(B, Hq, Sq, Dv)`;
    dq/dk/dv in the inputs' dtype, dgate `(Hq,)` in gate's dtype. Extra memory: five float32
    `(B, Hq, Sq)` row vectors (times the Dv tiles for two of them)."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    q, k, v, gate, dout = (x.contiguous() for x in (q, k, v, gate, dout))
    dq, dk, dvv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if b == 0 or hq == 0 or sq == 0 or sk == 0:
        return dq, dk, dvv, torch.zeros_like(gate)
    bd = max(16, triton.next_power_of_2(d))
    bv = _bv(q, bd, dv)
    nv = triton.cdiv(dv, bv)
    c = _chunk(q, bd)
    prec = _prec(q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    lse, den, da = (torch.empty(b * hq, sq, **f32) for _ in range(3))
    dl_parts = torch.empty(nv, b * hq, sq, **f32)
    args = (sq, sk, d, dv, hq, hq // hkv, pattern.window, pattern.sinks)
    window_linear_fwd_kernel[(b * hq, nv)](q, k, v, gate, dout, dout, lse, den, dl_parts, float(scale), *args,
                                           C=c, BD=bd, BV=bv, PREC=prec, PREP=True,
                                           num_warps=_warps(bd, bd))
    dl = dl_parts.sum(0)  # dO . L per row (a fixed order: deterministic)
    bdv = max(16, triton.next_power_of_2(dv))
    cb = 32 if not on_gpu(q) or max(bd, bdv) <= 64 else 16  # the (D, Dv) state lives in registers
    warps = _bwd_warps(bd, bdv)
    ltile = _linear_tile(q, bd, bdv)
    if ltile is None:  # one launch each: softmax and linear parts together, all of Dv in one program
        window_linear_bwd_dq_kernel[(b * hq, 1)](q, k, v, gate, dout, lse, den, da, dl, dq, float(scale), *args,
                                                 C=cb, BD=bd, BDV=bdv, PREC=prec, PART=0, num_warps=warps)
        window_linear_bwd_dkdv_kernel[(b * hkv, 1)](q, k, v, gate, dout, lse, den, da, dl, dk, dvv, float(scale),
                                                    *args, C=cb, BD=bd, BDV=bdv, PREC=prec, PART=0, num_warps=warps)
    else:  # the softmax part over all of Dv (4 warps: no state, and 8 spilled 8 bytes on sm_90), then
        # the linear part per Dv tile (float32 partial sums)
        nt = triton.cdiv(dv, ltile)
        dq_s, dk_s, dv_ = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)
        dq_p, dk_p = torch.empty((nt,) + tuple(q.shape), **f32), torch.empty((nt,) + tuple(k.shape), **f32)
        window_linear_bwd_dq_kernel[(b * hq, 1)](q, k, v, gate, dout, lse, den, da, dl, dq_s, float(scale), *args,
                                                 C=cb, BD=bd, BDV=bdv, PREC=prec, PART=1, num_warps=4)
        window_linear_bwd_dq_kernel[(b * hq, nt)](q, k, v, gate, dout, lse, den, da, dl, dq_p, float(scale), *args,
                                                  C=cb, BD=bd, BDV=ltile, PREC=prec, PART=2, num_warps=warps)
        window_linear_bwd_dkdv_kernel[(b * hkv, 1)](q, k, v, gate, dout, lse, den, da, dl, dk_s, dv_, float(scale),
                                                    *args, C=cb, BD=bd, BDV=bdv, PREC=prec, PART=1, num_warps=4)
        window_linear_bwd_dkdv_kernel[(b * hkv, nt)](q, k, v, gate, dout, lse, den, da, dl, dk_p, dv_, float(scale),
                                                     *args, C=cb, BD=bd, BDV=ltile, PREC=prec, PART=2,
                                                     num_warps=warps, num_stages=1)
        dq, dk, dvv = (dq_s + dq_p.sum(0)).to(q.dtype), (dk_s + dk_p.sum(0)).to(k.dtype), dv_.to(v.dtype)
    s = torch.sigmoid(gate.float())
    dgate = s * (1.0 - s) * (da - dl).view(b, hq, sq).sum(dim=(0, 2))
    return dq, dk, dvv, dgate.to(gate.dtype)


class _WindowLinearFn(torch.autograd.Function):
    """Saves q, k, v and gate only (no activations): the backward recomputes what it needs."""

    @staticmethod
    def forward(ctx, q, k, v, gate, pattern, scale):
        ctx.save_for_backward(q, k, v, gate)
        ctx.pattern, ctx.scale = pattern, scale
        return triton_window_linear(q, k, v, pattern, scale=scale, gate=gate)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gate = ctx.saved_tensors
        dq, dk, dv, dgate = triton_window_linear_backward(q, k, v, gate, dout, ctx.pattern, scale=ctx.scale)
        return dq, dk, dv, dgate, None, None


class TritonWindowLinear(TritonKernelMixin, Kernel):
    """WindowLinear fused in Triton (window softmax + linear memory), forward and backward: training
    calls go through `_WindowLinearFn` (gradients for q, k, v and gate, no atomics)."""

    name = "triton.window_linear"
    backend = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (WindowLinear,)
    #: every head dim to 256 compiles for sm_80 / sm_90 (bench/gpu_static.py; above 128 a spill is allowed)
    head_dims = (1, 256)
    supports_backward = True

    def import_error(self):
        return _IMPORT_ERROR

    def extra_reasons(self, p):
        return ["varlen inputs not supported"] if p.varlen else []

    def cost(self, p):
        if p.device.type == "cpu":  # the interpreter: only when backend="triton" is asked for
            return 1000.0 + 1e-6 * p.sq * p.batch * p.q_heads
        pat = p.pattern
        pairs = p.batch * p.q_heads * p.sq * (pat.window + pat.sinks + 32)
        flops = 2.0 * (p.head_dim + p.v_head_dim) * pairs + 4.0 * p.head_dim * p.v_head_dim * p.batch * p.q_heads * (
            p.sq + p.sk)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * (p.q_heads * p.sq * (p.head_dim + p.v_head_dim)
                                   + p.q_heads * p.sk * (p.head_dim + p.v_head_dim))
        programs = p.batch * p.q_heads * -(-p.v_head_dim // 64)
        eff = max(0.01, 0.3 * min(1.0, programs / max(p.device.units, 1)))
        fwd = roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=eff, overhead_s=15e-6)
        if not p.requires_grad:
            return fwd
        # backward: the forward again (prep), dq (~2x the forward's products, one program per query
        # head) and dk/dv (~3x, one program per kv head: the group's heads run in sequence)
        eff_dq = max(0.01, 0.3 * min(1.0, p.batch * p.q_heads / max(p.device.units, 1)))
        eff_kv = max(0.01, 0.3 * min(1.0, p.batch * p.kv_heads / max(p.device.units, 1)))
        dq = roofline_seconds(p, flops=2.0 * flops, bytes_moved=2 * nbytes, efficiency=eff_dq, overhead_s=15e-6)
        dkdv = roofline_seconds(p, flops=3.0 * flops, bytes_moved=2 * nbytes, efficiency=eff_kv, overhead_s=15e-6)
        return 2 * fwd + dq + dkdv

    def run(self, q, k, v, p, *, gate=None, sink_logits=None):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gate)):
            return _WindowLinearFn.apply(q, k, v, gate, p.pattern, p.scale)
        return triton_window_linear(q, k, v, p.pattern, scale=p.scale, gate=gate)


register(TritonWindowLinear())

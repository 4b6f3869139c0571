"""Triton kernels of the chunked delta rule (the WY / UT-transform form) and its decode step.

Math (docs/delta_rule.md, reference/delta.py): in a chunk entering with state `S_0` `(D, Dv)`,
with `b_t` the log-decays cumulated from the chunk start (a vector over key channels for KDA),

    A_ts = beta_t sum_d k_t[d] exp(b_t[d] - b_s[d]) k_s[d]           (s < t)
    T    = (I + A)^{-1}                                              (unit lower triangular)
    W_v  = T diag(beta) V,  W = T diag(beta) (exp(b) * K)             (the UT transform)
    P_ts = sum_d q_t[d] exp(b_t[d] - b_s[d]) k_s[d]                  (s <= t)
    U    = W_v - W S_0
    O    = scale ((exp(b) * Q) S_0 + P U)
    S'   = diag(exp(b_last)) S_0 + (exp(b_last - b) * K)^T U

Two kernels, split where the state enters:
- `delta_prep_kernel`, one program per (batch * value head, chunk), all chunks in parallel: A, P,
  T (forward substitution, one row per step), and W, W_v into float32 buffers;
- `delta_scan_kernel`, one program per (batch * value head, tile of Dv columns), walks the chunks
  in order with its `(D, BV)` slice of the state in float32 registers (the state's columns are
  independent: U, O and S' of a column tile need only that tile).

Exponents are differences `b_t - b_s` with `s <= t`, or `b_t`, `b_last - b_s`: all `<= 0` (the
launcher cumulates clamped decays inside each chunk), and masked entries are replaced by 0 before
the `exp`, so no `exp` of a positive number and no `-inf - -inf` appears. Per-channel decays enter
inside the sum over `d`: A and P are formed exactly, as `(C, C, BK)` blocks over slices of D.
q / k are read at their own head (`h // GRP`), never repeated.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_weights(X, Y, BCK, xb, yb, bb, rows, rmask, offs_c, D,
                  DECAY: tl.constexpr, STRICT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr):
    """`sum_d x_t[d] exp(b_t[d] - b_s[d]) y_s[d]` over the chunk's lower triangle (C, C), zero above
    it (and on the diagonal when STRICT). X / Y rows at `xb` / `yb`; DECAY 0 none, 1 per token (the
    caller applies it), 2 per channel (formed here, D in slices of BK)."""
    if STRICT:
        tri = offs_c[:, None] > offs_c[None, :]
    else:
        tri = offs_c[:, None] >= offs_c[None, :]
    tri = tri & rmask[:, None] & rmask[None, :]
    acc = tl.zeros([C, C], dtype=tl.float32)
    for d0 in range(0, D, BK):
        offs_k = d0 + tl.arange(0, BK)
        kmask = offs_k < D
        m2 = rmask[:, None] & kmask[None, :]
        x = tl.load(X + xb + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
        y = tl.load(Y + yb + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
        if DECAY == 2:
            b = tl.load(BCK + bb + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0)
            diff = tl.where(tri[:, :, None], b[:, None, :] - b[None, :, :], 0.0)
            e = tl.where(tri[:, :, None], tl.exp(diff), 0.0)
            acc += tl.sum(x[:, None, :] * y[None, :, :] * e, axis=2)
        else:
            acc += tl.dot(x, tl.trans(y), input_precision=PREC)
    return tl.where(tri, acc, 0.0)


@triton.jit
def delta_prep_kernel(Q, K, V, BETA, BC, W, WV, P, S, D, DV, HV, HK, GRP,
                      DECAY: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                      BK: tl.constexpr, PREC: tl.constexpr):
    """Per (value head, chunk): P (C, C) and the UT transform's W (C, D), W_v (C, Dv), float32.
    BC: chunk-local cumulative decays, (BH, S) (DECAY 1) or (BH, S, D) (DECAY 2)."""
    bh = tl.program_id(0)
    ic = tl.program_id(1)
    b = bh // HV
    hk = (bh % HV) // GRP
    qkb = (b * HK + hk) * S * D
    c0 = ic * C
    offs_c = tl.arange(0, C)
    rows = c0 + offs_c
    rmask = rows < S
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = offs_d < D
    vmask = offs_v < DV
    beta = tl.load(BETA + bh * S + rows, mask=rmask, other=0.0)
    a = _pair_weights(K, K, BC, qkb, qkb, bh * S * D, rows, rmask, offs_c, D, DECAY, True, C, BK, PREC)
    p = _pair_weights(Q, K, BC, qkb, qkb, bh * S * D, rows, rmask, offs_c, D, DECAY, False, C, BK, PREC)
    k = tl.load(K + qkb + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    if DECAY == 1:
        bt = tl.load(BC + bh * S + rows, mask=rmask, other=0.0)
        tri = (offs_c[:, None] >= offs_c[None, :]) & rmask[:, None] & rmask[None, :]
        w = tl.where(tri, tl.exp(tl.where(tri, bt[:, None] - bt[None, :], 0.0)), 0.0)
        a = a * w
        p = p * w
        k = k * tl.exp(bt)[:, None]
    if DECAY == 2:
        bt = tl.load(BC + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        k = k * tl.exp(bt)
    tl.store(P + bh * S * C + rows[:, None] * C + offs_c[None, :], p, mask=rmask[:, None])
    # T = I + X, X strictly lower: row i of (I + A) T = I gives X_i = -A_i - sum_{j<i} A_ij X_j
    x = -(a * beta[:, None])
    for i in range(1, C):
        sel = offs_c[:, None] == i
        xi = tl.sum(tl.where(sel, x, 0.0), axis=0)  # -A_i, zero at and above the diagonal
        xi = xi + tl.sum(xi[:, None] * x, axis=0)  # rows j < i of x are final
        x = tl.where(sel, xi[None, :], x)
    t = x + tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    v = tl.load(V + bh * S * DV + rows[:, None] * DV + offs_v[None, :], mask=rmask[:, None] & vmask[None, :],
                other=0.0).to(tl.float32)
    wv = tl.dot(t, v * beta[:, None], input_precision=PREC)
    wk = tl.dot(t, k * beta[:, None], input_precision=PREC)
    tl.store(WV + bh * S * DV + rows[:, None] * DV + offs_v[None, :], wv, mask=rmask[:, None] & vmask[None, :])
    tl.store(W + bh * S * D + rows[:, None] * D + offs_d[None, :], wk, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def delta_scan_kernel(Q, K, BC, W, WV, P, S0, O, SF, H, scale, S, D, DV, HV, HK, GRP,
                      DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_H: tl.constexpr, C: tl.constexpr,
                      BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per (value head, Dv tile): the chunks in order, `U = W_v - W S`, `O`, then the next state.
    STORE_H (the backward's recomputation): also the state entering each chunk, H (BH, n, D, Dv)."""
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = bh // HV
    hk = (bh % HV) // GRP
    qkb = (b * HK + hk) * S * D
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    dmask = offs_d < D
    vmask = offs_v < DV
    smask = dmask[:, None] & vmask[None, :]
    sptr = bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]
    if HAS_S0:
        state = tl.load(S0 + sptr, mask=smask, other=0.0)
    else:
        state = tl.zeros([BD, BV], dtype=tl.float32)
    nc = tl.cdiv(S, C)
    for c0 in range(0, S, C):
        if STORE_H:
            tl.store(H + (bh * nc + c0 // C) * D * DV + offs_d[:, None] * DV + offs_v[None, :], state, mask=smask)
        rows = c0 + offs_c
        rmask = rows < S
        m_d = rmask[:, None] & dmask[None, :]
        m_v = rmask[:, None] & vmask[None, :]
        q = tl.load(Q + qkb + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0).to(tl.float32)
        k = tl.load(K + qkb + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0).to(tl.float32)
        w = tl.load(W + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0)
        wv = tl.load(WV + bh * S * DV + rows[:, None] * DV + offs_v[None, :], mask=m_v, other=0.0)
        p = tl.load(P + bh * S * C + rows[:, None] * C + offs_c[None, :], mask=rmask[:, None], other=0.0)
        last = tl.minimum(c0 + C, S) - 1
        if DECAY == 1:
            bt = tl.load(BC + bh * S + rows, mask=rmask, other=0.0)
            bl = tl.load(BC + bh * S + last)
            q = q * tl.exp(bt)[:, None]
            k = k * tl.where(rmask, tl.exp(tl.where(rmask, bl - bt, 0.0)), 0.0)[:, None]
        if DECAY == 2:
            bt = tl.load(BC + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0)
            bl = tl.load(BC + bh * S * D + last * D + offs_d, mask=dmask, other=0.0)
            q = q * tl.exp(bt)
            k = k * tl.where(m_d, tl.exp(tl.where(m_d, bl[None, :] - bt, 0.0)), 0.0)
        u = wv - tl.dot(w, state, input_precision=PREC)
        o = tl.dot(q, state, input_precision=PREC) + tl.dot(p, u, input_precision=PREC)
        tl.store(O + bh * S * DV + rows[:, None] * DV + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
                 mask=m_v)
        if DECAY == 1:
            state = state * tl.exp(bl)
        if DECAY == 2:
            state = state * tl.exp(bl)[:, None]
        state = state + tl.dot(tl.trans(k), u, input_precision=PREC)
    tl.store(SF + sptr, state, mask=smask)


@triton.jit
def delta_step_kernel(Q, K, V, BETA, G, S_IN, S_OUT, O, scale, S, D, DV, HV, HK, GRP,
                      DECAY: tl.constexpr, HAS_S0: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """The recurrence token by token (decode), per (value head, Dv tile): the state slice stays in
    registers, read and written once. G: raw log-decays (BH, S) or (BH, S, D), clamped."""
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = bh // HV
    hk = (bh % HV) // GRP
    qkb = (b * HK + hk) * S * D
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    dmask = offs_d < D
    vmask = offs_v < DV
    smask = dmask[:, None] & vmask[None, :]
    sptr = bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]
    if HAS_S0:
        state = tl.load(S_IN + sptr, mask=smask, other=0.0)
    else:
        state = tl.zeros([BD, BV], dtype=tl.float32)
    for t in range(0, S):
        q = tl.load(Q + qkb + t * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        k = tl.load(K + qkb + t * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * S + t) * DV + offs_v, mask=vmask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + bh * S + t)
        if DECAY == 1:
            state = state * tl.exp(tl.load(G + bh * S + t))
        if DECAY == 2:
            state = state * tl.exp(tl.load(G + (bh * S + t) * D + offs_d, mask=dmask, other=0.0))[:, None]
        pred = tl.sum(k[:, None] * state, axis=0)  # S'^T k, (BV,)
        u = beta * (v - pred)
        state = state + k[:, None] * u[None, :]
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(O + (bh * S + t) * DV + offs_v, o.to(O.dtype.element_ty), mask=vmask)
    tl.store(S_OUT + sptr, state, mask=smask)


@triton.jit
def delta_bwd_scan_kernel(QD, KE, W, WV, P, CD, H, DO, DSF, DW, DQD, DKE, DWV, DP, DCD, DS0, scale, S, D, DV, NBH,
                          DECAY: tl.constexpr, HAS_DSF: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                          BV: tl.constexpr, PREC: tl.constexpr):
    """The backward's sequential part, per (value head, Dv tile), chunks in reverse (S a multiple of
    C). Inputs are the chunk terms (float32, per value head): QD = exp(b) * Q, KE = exp(b_last - b)
    * K, W, WV, P (BH, S, C), CD the chunk decays exp(b_last) (BH, n[, D]), H the entering states.
    With R the gradient of the state leaving a chunk:
        dU = scale P^T dO + KE R,   dW_v = dU,   dW = -dU S_0^T,   dP = scale dO U^T,
        dQD = scale dO S_0^T,   dKE = U R^T,   dCD = sum S_0 * R,
        R_prev = CD R + scale QD^T dO - W^T dU     (= d(initial state) after the first chunk).
    Terms summed over Dv (dW, dQD, dKE, dP, dCD) are written per tile (leading axis), summed by
    the launcher."""
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    dmask = offs_d < D
    vmask = offs_v < DV
    smask = dmask[:, None] & vmask[None, :]
    sptr = bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]
    if HAS_DSF:
        r = tl.load(DSF + sptr, mask=smask, other=0.0)
    else:
        r = tl.zeros([BD, BV], dtype=tl.float32)
    part = iv * NBH + bh
    nc = S // C
    for i in range(0, nc):
        ic = nc - 1 - i
        rows = ic * C + offs_c
        m_d = dmask[None, :]
        m_v = vmask[None, :]
        qd = tl.load(QD + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0)
        ke = tl.load(KE + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0)
        w = tl.load(W + bh * S * D + rows[:, None] * D + offs_d[None, :], mask=m_d, other=0.0)
        wv = tl.load(WV + bh * S * DV + rows[:, None] * DV + offs_v[None, :], mask=m_v, other=0.0)
        p = tl.load(P + bh * S * C + rows[:, None] * C + offs_c[None, :])
        do = tl.load(DO + bh * S * DV + rows[:, None] * DV + offs_v[None, :], mask=m_v, other=0.0)
        s0 = tl.load(H + (bh * nc + ic) * D * DV + offs_d[:, None] * DV + offs_v[None, :], mask=smask, other=0.0)
        u = wv - tl.dot(w, s0, input_precision=PREC)
        du = scale * tl.dot(tl.trans(p), do, input_precision=PREC) + tl.dot(ke, r, input_precision=PREC)
        tl.store(DWV + bh * S * DV + rows[:, None] * DV + offs_v[None, :], du, mask=m_v)
        pd = part * S * D + rows[:, None] * D + offs_d[None, :]
        tl.store(DW + pd, -tl.dot(du, tl.trans(s0), input_precision=PREC), mask=m_d)
        tl.store(DQD + pd, scale * tl.dot(do, tl.trans(s0), input_precision=PREC), mask=m_d)
        tl.store(DKE + pd, tl.dot(u, tl.trans(r), input_precision=PREC), mask=m_d)
        tl.store(DP + part * S * C + rows[:, None] * C + offs_c[None, :],
                 scale * tl.dot(do, tl.trans(u), input_precision=PREC))
        if DECAY == 1:
            tl.store(DCD + part * nc + ic, tl.sum(tl.sum(s0 * r, axis=1), axis=0))
            cd = tl.load(CD + bh * nc + ic)
            r = r * cd
        if DECAY == 2:
            tl.store(DCD + (part * nc + ic) * D + offs_d, tl.sum(s0 * r, axis=1), mask=dmask)
            cd = tl.load(CD + (bh * nc + ic) * D + offs_d, mask=dmask, other=0.0)
            r = r * cd[:, None]
        r = r + scale * tl.dot(tl.trans(qd), do, input_precision=PREC) - tl.dot(tl.trans(w), du, input_precision=PREC)
    tl.store(DS0 + sptr, r, mask=smask)

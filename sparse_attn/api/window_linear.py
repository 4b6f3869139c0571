"""Constant-memory decode of one `WindowLinear` layer: `WindowLinearDecoder`.

The storage is a `WindowLinearState` (sparse_attn/cache/window_linear.py: the sinks, a ring of the
last `window` tokens, `(M, z)`), written in place. A one-token step is planned by the scheduler
(op "window_linear_step": `reference.window_linear_step`, `cpu.window_linear_step`,
`triton.window_linear_step`); `decoder.plan_step(q).explain()` shows the candidates. A chunk of
several tokens (chunked continuation, speculative decode) runs the reference path below, written
with whole-piece matrix products (it does not loop the step kernel).
"""
from __future__ import annotations

import torch

from ..backends.reference.softmax import acc_dtype, softmax_attention
from ..backends.reference.window_linear import phi, window_linear_attention
from ..cache.window_linear import WindowLinearState
from ..patterns import WindowLinear
from ..scheduler.device import device_info
from ..scheduler.plan import Plan, choose
from ..scheduler.problem import Problem, check_backend, check_qkv, check_scale

_LINEAR_CHUNK = 128  # tokens per piece of a multi-token continuation


class WindowLinearDecoder:
    """Decode state of one `WindowLinear` layer: the sinks' keys, the last `window` keys at most and
    the `(M, z)` memory of the evicted ones, in fixed-size storage updated in place (constant memory
    at any context). `step(q, k, v)` appends one token and `extend(q, k, v)` any number; both
    return the matching rows of the prefill `attention(..., WindowLinear, gate=)`.

    `backend` (None: the scheduler's choice) applies to the one-token steps. Decoding is inference:
    with inputs that require grad the step kernels refuse (their reasons are in `plan_step`)."""

    def __init__(self, pattern: WindowLinear, *, gate, scale: float | None = None, backend: str | None = None):
        if not isinstance(pattern, WindowLinear):
            raise TypeError(f"pattern must be a WindowLinear, got {type(pattern).__name__}")
        check_backend(backend)
        self.pattern, self.gate, self.scale, self.backend = pattern, gate, scale, backend
        self.state: WindowLinearState | None = None
        self._plan_key = self._plan = None

    @classmethod
    def from_prefill(cls, k, v, pattern: WindowLinear, *, gate, scale: float | None = None,
                     backend: str | None = None):
        """Start after a prefill of `k`/`v` `(B, Hkv, S, *)`: keeps only the sinks, the last
        `window - 1` keys (the next token completes the window) and the memory of the rest."""
        dec = cls(pattern, gate=gate, scale=scale, backend=backend)
        dec._reset(k, v)
        return dec

    # ------------------------------------------------------------------------------ inspection
    @property
    def length(self) -> int:
        return 0 if self.state is None else self.state.length

    @property
    def memory(self):
        """`(M (B, Hkv, D, Dv), z (B, Hkv, D))` over the evicted tokens, or None before any token."""
        return None if self.state is None else (self.state.M, self.state.z)

    def cached_tokens(self) -> int:
        return 0 if self.state is None else self.state.cached_tokens()

    def tensors(self) -> list:
        """Every tensor the decoder holds (sink and ring K/V, `M`, `z`)."""
        return [] if self.state is None else self.state.tensors()

    # ----------------------------------------------------------------------------------- storage
    def _ensure_state(self, k, v):
        if self.state is None:
            b, hkv, _, d = k.shape
            self.state = WindowLinearState(window=self.pattern.window, sinks=self.pattern.sinks, batch=b,
                                           kv_heads=hkv, head_dim=d, v_head_dim=v.shape[3], dtype=k.dtype,
                                           device=k.device)
        st = self.state
        want = (st.batch, st.kv_heads, st.head_dim, st.v_head_dim, st.dtype, st.device)
        got = (k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device)
        if got != want:
            raise ValueError(f"k/v of shape {tuple(k.shape)}/{tuple(v.shape)} ({k.dtype}, {k.device}) do not match "
                             f"this decoder's storage (B, Hkv, D, Dv, dtype, device) = {want}")
        return st

    def _reset(self, k, v):
        """Replace the state by the one after the whole history `k`/`v` `(B, Hkv, S, *)`."""
        self.state = None
        st = self._ensure_state(k, v)
        s = k.shape[2]
        ns = min(self.pattern.sinks, s)
        keep = max(ns, s - (self.pattern.window - 1))
        acc = acc_dtype(k.dtype)
        fk, va = phi(k[:, :, ns:keep].to(acc)), v[:, :, ns:keep].to(acc)
        st.reset(k, v, memory=(torch.matmul(fk.transpose(-1, -2), va), fk.sum(dim=2)))

    # ------------------------------------------------------------------------------------ steps
    def _scale(self, d: int) -> float:
        return check_scale(self.scale, d)

    def plan_step(self, q, k=None, v=None) -> Plan:
        """The scheduler's decision for the next one-token step with query `q` `(B, Hq, 1, D)`
        (k, v default to q's shapes; they only fix Hkv and Dv, taken from the storage when it exists)."""
        st = self.state
        b, hq, _, d = q.shape
        if st is not None:
            hkv, dv = st.kv_heads, st.v_head_dim
        else:
            hkv = (k if k is not None else q).shape[1]
            dv = (v if v is not None else q).shape[3]
        length = self.length
        n_vis = min(self.pattern.sinks, length + 1) + min(self.pattern.window, max(0, length + 1 - self.pattern.sinks))
        rg = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, self.gate))
        key = (b, hq, hkv, d, dv, n_vis, q.dtype, q.device, rg)
        if key != self._plan_key:
            problem = Problem(batch=b, q_heads=hq, kv_heads=hkv, sq=1, sk=n_vis, head_dim=d, v_head_dim=dv,
                              dtype=q.dtype, device=device_info(q.device), pattern=self.pattern,
                              scale=self._scale(d), requires_grad=rg)
            self._plan, self._plan_key = choose(problem, backend=self.backend, op="window_linear_step"), key
        return self._plan

    def _check_step_inputs(self, q, k, v):
        check_qkv(q, k, v)
        if not (q.shape[2] == k.shape[2] == v.shape[2]):
            raise ValueError(f"q, k, v must hold the same new tokens, got lengths {q.shape[2]}, {k.shape[2]}, "
                             f"{v.shape[2]}")
        if not isinstance(self.gate, torch.Tensor) or self.gate.shape != (q.shape[1],):
            raise ValueError(f"gate must be a (Hq,) = ({q.shape[1]},) tensor")
        if self.gate.device != q.device:
            raise ValueError(f"gate is on {self.gate.device} but q is on {q.device}")

    def step(self, q, k, v):
        """q `(B, Hq, 1, D)`, k/v `(B, Hkv, 1, *)` of the next token -> `(B, Hq, 1, Dv)`."""
        self._check_step_inputs(q, k, v)
        if q.shape[2] != 1:
            raise ValueError(f"step takes one token, got {q.shape[2]} (use extend)")
        p = self.plan_step(q, k, v)
        st = self._ensure_state(k, v)
        slots = st.next_slots()
        o = p.kernel.run(q, k, v, p.problem, gate=self.gate, state=st, slots=slots)
        st.commit(slots)
        return o

    def extend(self, q, k, v):
        """q `(B, Hq, S, D)`, k/v `(B, Hkv, S, *)` of the next `S` tokens (any `S`) -> `(B, Hq, S, Dv)`.

        `S == 1` is `step`. Before any token is evicted the buffers are the whole history, so the
        prefill formula runs on them. After, the tokens go in pieces of at most `_LINEAR_CHUNK`:
        the softmax part attends over `sinks + window + piece` (the sliding-window rule is relative
        to the end, and with the sinks full the kept keys keep their distances to the queries,
        so it sees exactly the prefill's keys), and the linear part reads the memory plus the
        window keys that leave it inside the piece, under the mask `j <= p - window`.
        """
        self._check_step_inputs(q, k, v)
        s = q.shape[2]
        if s == 1:
            return self.step(q, k, v)
        if s == 0:
            return q.new_zeros(*q.shape[:3], v.shape[3])
        if self.state is None or self.cached_tokens() == self.length:
            if self.state is not None:
                sk, sv = self.state.sinks_kv()
                wk, wv = self.state.window_kv()
                k, v = torch.cat([sk, wk, k], 2), torch.cat([sv, wv, v], 2)
            o = window_linear_attention(q, k, v, self.pattern, scale=self._scale(q.shape[3]), gate=self.gate)
            self._reset(k, v)
            return o
        outs = [self._extend_evicting(q[:, :, r0:r0 + _LINEAR_CHUNK], k[:, :, r0:r0 + _LINEAR_CHUNK],
                                      v[:, :, r0:r0 + _LINEAR_CHUNK]) for r0 in range(0, s, _LINEAR_CHUNK)]
        return torch.cat(outs, dim=2)

    def _extend_evicting(self, q, k, v):
        """`extend` for a piece of `r` tokens once tokens have been evicted (so the sinks are full)."""
        st = self._ensure_state(k, v)
        b, hq, r, d = q.shape
        hkv, dv = k.shape[1], v.shape[3]
        g = hq // hkv
        window, p0 = self.pattern.window, st.length
        acc = acc_dtype(q.dtype)
        scale = self._scale(d)
        sk, sv = st.sinks_kv()
        wk, wv = st.window_kv()
        a = softmax_attention(q, torch.cat([sk, wk, k], 2), torch.cat([sv, wv, v], 2), self.pattern.softmax_part,
                              scale=scale, out_dtype=acc).view(b, hkv, g, r, dv)
        bk, bv = torch.cat([wk, k], 2), torch.cat([wv, v], 2)  # positions [f, p0 + r)
        f = p0 - wk.shape[2]
        n_ev = max(0, p0 + r - window - f)  # window keys j <= p0 + r - 1 - window leave in this piece
        fq = phi(q.to(acc)).view(b, hkv, g, r, d)
        num = torch.matmul(fq, st.M[:, :, None])
        den = torch.matmul(fq, st.z[:, :, None, :, None])  # (B, Hkv, G, r, 1)
        if n_ev:
            fk, ve = phi(bk[:, :, :n_ev].to(acc)), bv[:, :, :n_ev].to(acc)
            qpos = torch.arange(p0, p0 + r, device=q.device)
            kpos = torch.arange(f, f + n_ev, device=q.device)
            vis = (kpos[None, :] <= qpos[:, None] - window).to(acc)  # (r, n_ev)
            w = torch.matmul(fq, fk[:, :, None].transpose(-1, -2)) * vis
            num = num + torch.matmul(w, ve[:, :, None])
            den = den + w.sum(dim=-1, keepdim=True)
            st.M.add_(torch.matmul(fk.transpose(-1, -2), ve))
            st.z.add_(fk.sum(dim=2))
        lin = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
        w = torch.sigmoid(self.gate.to(acc)).view(1, hkv, g, 1, 1)
        st.set_window(bk[:, :, n_ev:], bv[:, :, n_ev:], length=p0 + r)
        return (w * a + (1.0 - w) * lin).reshape(b, hq, r, dv).to(q.dtype)

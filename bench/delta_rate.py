"""Delta rule on the CPU: the issue's targets measured in one process (docs/delta_rule.md).

    python bench/delta_rate.py                       # B=1 H=16 D=Dv=128 S=16384, float32, ~2-4 min

Rows (best of `--reps`, each repeat alternating every kernel with an `n^3` float32 GEMM, so a busy
neighbour lowers both alike):
- forward: `cpu.delta_chunked` (Gated DeltaNet decays, beta from a sigmoid, qk_l2norm) against
  transformers' `torch_chunk_gated_delta_rule` (what a CPU user of Qwen3-Next runs) on the same
  inputs; `GF/s` counts the chunked form's FLOPs at C = 64 (`DeltaRule.chunked_flops`), `of GEMM`
  is that rate over the same run's GEMM rate;
- forward + backward: `delta_rule` under autograd (the scheduler's training kernel) against the
  fallback under autograd, loss = sum(o * w);
- decode: one token on top of a state, `delta_rule(..., initial_state=...)`, at 4K / 32K / 128K
  tokens of context (the state does not grow: the per-token time must not either).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def best(fn, reps, gemm=None):
    ts, gs = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if gemm is not None:
            t0 = time.perf_counter()
            gemm()
            gs.append(time.perf_counter() - t0)
    return min(ts), (min(gs) if gs else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--s", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gemm", type=int, default=2048)
    ap.add_argument("--train-s", type=int, default=4096, help="sequence length of the forward+backward rows")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: fwd,train,decode")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sparse_attn as sa
    from sparse_attn.api.delta import plan_delta_rule
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    torch.manual_seed(0)
    b, h, d = 1, args.heads, args.d
    skip = set(args.skip.split(","))
    n = args.gemm
    x, y = torch.randn(n, n), torch.randn(n, n)
    gemm = lambda: torch.mm(x, y)  # noqa: E731
    print(f"# threads={torch.get_num_threads()} load={os.getloadavg()} B={b} H={h} D=Dv={d} float32")

    def inputs(s, grad=False):
        q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
        beta = torch.sigmoid(torch.randn(b, h, s))
        g = -torch.nn.functional.softplus(torch.randn(b, h, s)) * 0.5
        ins = [q, k, v, beta, g]
        return [t.requires_grad_(grad) for t in ins]

    def fallback(q, k, v, beta, g):  # transformers' layout is (B, S, H, D)
        o, _ = torch_chunk_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            g.transpose(1, 2), beta.transpose(1, 2), use_qk_l2norm_in_kernel=True)
        return o

    def ours(q, k, v, beta, g):
        return sa.delta_rule(q, k, v, beta, decay=g, qk_l2norm=True)

    if "fwd" not in skip:
        s = args.s
        q, k, v, beta, g = inputs(s)
        p = plan_delta_rule(q, k, v, beta, decay=g, qk_l2norm=True)
        print(p.explain())
        flops = p.problem.pattern.chunked_flops(p.problem, 64)
        with torch.no_grad():
            err = (ours(q, k, v, beta, g) - fallback(q, k, v, beta, g).transpose(1, 2)).norm() / \
                fallback(q, k, v, beta, g).norm()
            t_ours, t_gemm = best(lambda: ours(q, k, v, beta, g), args.reps, gemm)
            t_fb, _ = best(lambda: fallback(q, k, v, beta, g), max(1, args.reps - 1))
        gemm_rate = 2 * n ** 3 / t_gemm / 1e9
        rate = flops / t_ours / 1e9
        print(f"forward S={s}: {p.kernel.name} {t_ours * 1e3:.1f} ms, fallback {t_fb * 1e3:.1f} ms, "
              f"speedup {t_fb / t_ours:.2f}x; {rate:.1f} GF/s (C=64 FLOPs {flops / 1e9:.1f} G) = "
              f"{rate / gemm_rate:.2f} of the GEMM's {gemm_rate:.1f} GF/s; rel diff to fallback {err:.1e}")

    if "train" not in skip:
        s = args.train_s
        ins = inputs(s, grad=True)
        w = torch.randn(b, h, s, d)
        p = plan_delta_rule(*ins[:4], decay=ins[4], qk_l2norm=True)
        print(p.explain())

        def step(fn, transpose):
            o = fn(*ins)
            loss = (o * (w.transpose(1, 2) if transpose else w)).sum()
            loss.backward()
            for t in ins:
                t.grad = None

        t_ours, _ = best(lambda: step(ours, False), max(1, args.reps - 1))
        t_fb, _ = best(lambda: step(fallback, True), max(1, args.reps - 1))
        print(f"forward+backward S={s}: {p.kernel.name} {t_ours * 1e3:.1f} ms, fallback {t_fb * 1e3:.1f} ms, "
              f"speedup {t_fb / t_ours:.2f}x")

    if "decode" not in skip:
        for ctx in (4096, 32768, 131072):
            q, k, v, beta, g = inputs(1)
            st = torch.randn(b, h, d, d) * 0.01  # the state after `ctx` tokens has this size whatever ctx is
            p = plan_delta_rule(q, k, v, beta, decay=g, initial_state=st, qk_l2norm=True)
            t, _ = best(lambda: sa.delta_rule(q, k, v, beta, decay=g, initial_state=st, qk_l2norm=True,
                                              return_state=True), 20)
            print(f"decode ctx={ctx}: {p.kernel.name} {t * 1e6:.0f} us per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

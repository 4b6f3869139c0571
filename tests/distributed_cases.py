"""The cases of tests/test_distributed.py, run inside each rank of a gloo process group.

`run_rank(rank, world, init, out_dir)` is the `torch.multiprocessing` entry point. Process start-up
(importing torch) dominates on a small CPU, so ONE set of `max(WORLDS)` processes serves every world
size: for each size `w` a subgroup of ranks `[0, w)` runs every case (one process group reused
across cases, one thread per rank), and each member writes `{case: [errors...] | "error: ..."}` to
`out_dir/w{w}-rank{rank}.json`; the test process reads the files and asserts. Every case draws its full-length inputs from a seed shared by
all ranks, shards them, and compares this rank's rows (and gradients) with the float64 oracle on
the full sequence.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import infllmv2_oracle  # noqa: E402
import oracle  # noqa: E402
from delta_oracle import oracle_delta_rule  # noqa: E402

#: full lengths per world size: none divides by 2 * world, so zigzag and contiguous shards are uneven
LENGTHS = {2: 77, 3: 61, 4: 53}
BS = 8  # block size of BlockSparse / TopK: the lengths are not multiples of it either


def _seed(name):
    torch.manual_seed(zlib.crc32(name.encode()))


def _patterns(sa, s, hkv):
    nb = -(-s // BS)
    lay = torch.rand(1, hkv, nb, nb) < 0.5
    return {"dense": sa.Dense(), "window": sa.SlidingWindow(13), "window_sinks": sa.SlidingWindow(9, sinks=3),
            "block_sparse": sa.BlockSparse(lay, block_size=BS), "topk": sa.TopK(2, block_size=BS),
            "dense_noncausal": sa.Dense(causal=False)}


def _infllmv2_patterns(sa):
    """InfLLMv2 at small sizes: MiniCPM4.1's rule (coarse normaliser), MiniCPM4's (exact, kernel
    size not a multiple of the stride: chunks of gcd = 2 keys), and one below dense_len (Dense)."""
    return {"infllmv2": sa.InfLLMv2(topk=4, block_size=8, kernel_size=4, kernel_stride=2, init_blocks=1,
                                    local_blocks=1, dense_len=-1),
            "infllmv2_exact": sa.InfLLMv2(topk=3, block_size=8, kernel_size=6, kernel_stride=4, init_blocks=1,
                                          local_blocks=2, dense_len=-1, variant="minicpm4"),
            "infllmv2_dense": sa.InfLLMv2(topk=2, block_size=8, kernel_size=4, kernel_stride=2, dense_len=1000)}


def _infllmv2_inputs(pattern, s, name):
    """Inputs (same on every rank) whose InfLLMv2 selection is not decided by rounding."""
    for i in range(40):
        _seed(f"{name}-{i}")
        q, k, v = torch.randn(1, 4, s, 16), torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 12)
        if infllmv2_oracle.margin(q, k, pattern) > 1e-5:
            return q, k, v
    raise RuntimeError("no well-separated InfLLMv2 input")


def _attention_case(sa, cp, g, pattern, q, k, v, layout, transport=None):
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    full = [x.to(torch.float64).requires_grad_() for x in (q, k, v)]
    ref = (infllmv2_oracle.attention if isinstance(pattern, sa.InfLLMv2) else oracle.oracle_attention)(*full, pattern)
    ref.backward(do.to(torch.float64))
    loc = [cp.shard(x, g, layout=layout).requires_grad_() for x in (q, k, v)]
    out = cp.cp_attention(*loc, pattern, group=g, layout=layout, transport=transport)
    out.backward(cp.shard(do, g, layout=layout))
    errs = [oracle.rel_err(out, cp.shard(ref, g, layout=layout))]
    errs += [oracle.rel_err(x.grad, cp.shard(r.grad, g, layout=layout)) for x, r in zip(loc, full)]
    finite = all(torch.isfinite(t).all() for t in [out] + [x.grad for x in loc])
    return errs if finite else ["non-finite"]


def attention_cases(sa, cp, g, world):
    s, res = LENGTHS[world], {}
    for layout in ("zigzag", "contiguous"):
        _seed(f"{world}-{layout}")
        q, k, v = torch.randn(1, 4, s, 16), torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 12)
        for pname, pattern in _patterns(sa, s, 2).items():
            res[f"attn-{pname}-{layout}"] = _attention_case(sa, cp, g, pattern, q, k, v, layout)
        for pname, pattern in _infllmv2_patterns(sa).items():
            qi, ki, vi = _infllmv2_inputs(pattern, s, f"{world}-{layout}-{pname}")
            res[f"attn-{pname}-{layout}"] = _attention_case(sa, cp, g, pattern, qi, ki, vi, layout)
    if world == 2:  # both transports forced, MQA (Hkv = 1), a length below 2 * world * BS
        _seed("transports")
        q, k, v = torch.randn(2, 4, 21, 8), torch.randn(2, 1, 21, 8), torch.randn(2, 1, 21, 8)
        for tr in ("ring", "allgather"):
            for pname in ("dense", "topk", "window_sinks"):
                res[f"transport-{tr}-{pname}"] = _attention_case(sa, cp, g, _patterns(sa, 21, 1)[pname], q, k, v,
                                                                 "zigzag", tr)
    if world == 4:  # fewer tokens than chunks: some ranks hold nothing
        _seed("tiny")
        q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        for layout in ("zigzag", "contiguous"):
            res[f"tiny-dense-{layout}"] = _attention_case(sa, cp, g, sa.Dense(), q, k, v, layout)
    return res


def linear_cases(sa, cp, g, world):
    s, res = LENGTHS[world], {}
    for layout in ("contiguous", "zigzag"):
        for kind in ("none", "per-head", "per-token"):
            _seed(f"lin-{world}-{layout}-{kind}")
            b, h, d, dv = 1, 2, 8, 6
            q, k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, dv)
            decay = {"none": None, "per-head": -torch.rand(h), "per-token": -torch.rand(b, h, s) * 0.5}[kind]
            s0 = torch.randn(b, h, d, dv) if kind == "per-head" else None
            do, ds = torch.randn(b, h, s, dv), torch.randn(b, h, d, dv)
            full = [x.to(torch.float64).requires_grad_() for x in (q, k, v)]
            fdec = None if decay is None else decay.to(torch.float64).requires_grad_()
            fs0 = None if s0 is None else s0.to(torch.float64).requires_grad_()
            ref, ref_state = oracle.oracle_linear_attention(*full, decay=fdec, initial_state=fs0)
            ((ref * do.double()).sum() + (ref_state * ds.double()).sum()).backward()
            loc = [cp.shard(x, g, layout=layout).requires_grad_() for x in (q, k, v)]
            ldec = None if decay is None else (decay.clone() if kind == "per-head" else cp.shard(decay, g, layout=layout))
            if ldec is not None:
                ldec.requires_grad_()
            ls0 = None if s0 is None else s0.clone().requires_grad_()
            out, state = cp.cp_linear_attention(*loc, decay=ldec, group=g, layout=layout, initial_state=ls0,
                                                return_state=True, backend="reference")
            ((out * cp.shard(do, g, layout=layout)).sum() + (state * ds).sum() / world).backward()
            errs = [oracle.rel_err(out, cp.shard(ref, g, layout=layout)), oracle.rel_err(state, ref_state)]
            errs += [oracle.rel_err(x.grad, cp.shard(r.grad, g, layout=layout)) for x, r in zip(loc, full)]
            if kind == "per-token":
                errs.append(oracle.rel_err(ldec.grad, cp.shard(fdec.grad, g, layout=layout)))
            if kind == "per-head":  # replicated inputs: each rank holds its share of the gradient
                gd, g0 = ldec.grad.clone(), ls0.grad.clone()
                dist.all_reduce(gd, group=g)
                dist.all_reduce(g0, group=g)
                errs += [oracle.rel_err(gd, fdec.grad), oracle.rel_err(g0, fs0.grad)]
            res[f"linear-{kind}-{layout}"] = errs
    return res


def delta_cases(sa, cp, g, world):
    """cp_delta_rule against the float64 step oracle on the full sequence: every decay kind (none,
    Gated DeltaNet's per-token, KDA's per-channel), GQA (Hv = 2 Hk), both layouts, an initial state,
    forward, final state and the gradients of q, k, v, beta, decay and the initial state."""
    s, res = LENGTHS[world], {}
    for layout in ("contiguous", "zigzag"):
        for kind in ("none", "per-token", "per-channel"):
            _seed(f"delta-{world}-{layout}-{kind}")
            b, hk, hv, d, dv = 1, 1, 2, 8, 6
            q, k = torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)
            v, beta = torch.randn(b, hv, s, dv), torch.rand(b, hv, s)
            decay = {"none": None, "per-token": -torch.rand(b, hv, s), "per-channel": -torch.rand(b, hv, s, d)}[kind]
            s0 = torch.randn(b, hv, d, dv) if kind != "none" else None
            do, ds = torch.randn(b, hv, s, dv), torch.randn(b, hv, d, dv)
            full = [x.to(torch.float64).requires_grad_() for x in (q, k, v, beta)]
            fdec = None if decay is None else decay.to(torch.float64).requires_grad_()
            fs0 = None if s0 is None else s0.to(torch.float64).requires_grad_()
            ref, ref_state = oracle_delta_rule(*full, decay=fdec, initial_state=fs0, qk_l2norm=True)
            ((ref * do.double()).sum() + (ref_state * ds.double()).sum()).backward()
            loc = [cp.shard(x, g, layout=layout).requires_grad_() for x in (q, k, v, beta)]
            ldec = None if decay is None else cp.shard(decay, g, layout=layout).requires_grad_()
            ls0 = None if s0 is None else s0.clone().requires_grad_()
            out, state = cp.cp_delta_rule(*loc, decay=ldec, group=g, layout=layout, initial_state=ls0,
                                          return_state=True, qk_l2norm=True, backend="reference")
            ((out * cp.shard(do, g, layout=layout)).sum() + (state * ds).sum() / world).backward()
            errs = [oracle.rel_err(out, cp.shard(ref, g, layout=layout)), oracle.rel_err(state, ref_state)]
            errs += [oracle.rel_err(x.grad, cp.shard(r.grad, g, layout=layout)) for x, r in zip(loc, full)]
            if ldec is not None:
                errs.append(oracle.rel_err(ldec.grad, cp.shard(fdec.grad, g, layout=layout)))
            if ls0 is not None:  # replicated input: each rank holds its share of the gradient
                g0 = ls0.grad.clone()
                dist.all_reduce(g0, group=g)
                errs.append(oracle.rel_err(g0, fs0.grad))
            res[f"delta-{kind}-{layout}"] = errs
    return res


def cache_cases(sa, cp, g, world):
    res = {}
    _seed(f"cache-{world}")
    b, hq, hkv, d, max_len, prefill = 1, 4, 2, 8, 70, 41
    k, v = torch.randn(b, hkv, max_len, d), torch.randn(b, hkv, max_len, d)
    qs = torch.randn(b, hq, max_len, d)
    nb = -(-max_len // BS)
    lay = torch.rand(1, hkv, nb, nb) < 0.5
    pats = {"dense": sa.Dense(), "window_sinks": sa.SlidingWindow(10, sinks=2), "topk": sa.TopK(2, block_size=BS)}
    for name, pattern in pats.items():
        cache = cp.ShardedKVCache(b, hkv, d, max_len, group=g, pool_block_size=BS)
        cache.append(k[:, :, :prefill], v[:, :, :prefill])
        errs = []
        for t in range(prefill, prefill + 3):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            q = qs[:, :, t:t + 1]
            out = sa.attention_with_cache(q, cache, pattern)
            ref = oracle.oracle_attention(q.double(), k[:, :, :t + 1].double(), v[:, :, :t + 1].double(), pattern)
            errs.append(oracle.rel_err(out, ref))
        res[f"cache-{name}"] = errs
    # an int8 cache: each rank quantizes the rows it owns; against the oracle over the dequantized rows
    from sparse_attn.cache.quant import dequantize, quantize_rows_torch
    dk, dv = (dequantize(*quantize_rows_torch(x, "int8"), torch.float64) for x in (k, v))
    cache = cp.ShardedKVCache(b, hkv, d, max_len, group=g, pool_block_size=BS, kv_dtype="int8")
    cache.append(k[:, :, :prefill], v[:, :, :prefill])
    errs = []
    for t in range(prefill, prefill + 3):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref = oracle.oracle_attention(qs[:, :, t:t + 1].double(), dk[:, :, :t + 1], dv[:, :, :t + 1], sa.Dense())
        errs.append(oracle.rel_err(sa.attention_with_cache(qs[:, :, t:t + 1], cache, sa.Dense()), ref))
    res["cache-int8_dense"] = errs
    # block-sparse decode of two rows at once (Sq = 2), layout sliced to the current length
    cache = cp.ShardedKVCache(b, hkv, d, max_len, group=g, pool_block_size=BS)
    cache.append(k[:, :, :50], v[:, :, :50])
    n = -(-50 // BS)
    pat = sa.BlockSparse(lay[:, :, :n, :n], block_size=BS)
    ref = oracle.oracle_attention(qs[:, :, 48:50].double(), k[:, :, :50].double(), v[:, :, :50].double(), pat)
    res["cache-block_sparse"] = [oracle.rel_err(cache.attend(qs[:, :, 48:50], pat), ref)]
    # InfLLMv2: the chunk sums kept per rank; a 3-key chunk straddles the shard boundaries (spans of 16)
    pats = dict(_infllmv2_patterns(sa))
    pats["infllmv2_c3"] = sa.InfLLMv2(topk=3, block_size=9, kernel_size=6, kernel_stride=3, local_blocks=1,
                                      dense_len=-1)
    for name, pattern in pats.items():
        q, k, v = _infllmv2_inputs(pattern, 46, f"cache-{name}")
        cache = cp.ShardedKVCache(1, 2, 16, 46, group=g, pool_block_size=BS, v_head_dim=12)
        cache.append(k[:, :, :40], v[:, :, :40])
        errs = []
        for t in (40, 41, 43):  # steps of one row, then one of two rows (Sq = 2)
            rows = 2 if t == 43 else 1
            cache.append(k[:, :, cache.length:t + 1], v[:, :, cache.length:t + 1])
            out = sa.attention_with_cache(q[:, :, t + 1 - rows:t + 1], cache, pattern)
            ref = infllmv2_oracle.attention(q[:, :, t + 1 - rows:t + 1].double(), k[:, :, :t + 1].double(),
                                            v[:, :, :t + 1].double(), pattern)
            errs.append(oracle.rel_err(out, ref))
        res[f"cache-{name}"] = errs
    return res


def traffic_cases(sa, cp, g, world):
    """Bytes of K/V sent by this rank in one forward, per pattern (recorded, compared by the test)."""
    res = {}
    _seed("traffic")
    s, d = 512, 16
    q, k, v = torch.randn(1, 2, s, d), torch.randn(1, 1, s, d), torch.randn(1, 1, s, d)
    # locality, as in real models: blocks 2 and 5 are the ones every query prefers
    hot = torch.randn(d) * 3
    k[:, :, 2 * 16:3 * 16] += hot
    k[:, :, 5 * 16:6 * 16] += hot
    q += hot / 3
    pats = {"dense": sa.Dense(), "window": sa.SlidingWindow(32), "topk": sa.TopK(2, block_size=16),
            # the models' kernel = 2 strides; chunk sums of 8 keys (the models: 16)
            "infllmv2": sa.InfLLMv2(topk=4, block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1,
                                    local_blocks=1, dense_len=-1)}
    for layout in ("zigzag", "contiguous"):
        for name, pattern in pats.items():
            loc = [cp.shard(x, g, layout=layout) for x in (q, k, v)]
            with cp.count_bytes() as c:
                out = cp.cp_attention(*loc, pattern, group=g, layout=layout, transport="ring")
            if isinstance(pattern, sa.InfLLMv2):  # the single-process InfLLMv2 (its oracle is slow at 512)
                ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
            else:
                ref = oracle.oracle_attention(q.double(), k.double(), v.double(), pattern)
            res[f"traffic-{name}-{layout}"] = {"kv": c.sent.get("kv", 0), "stats": c.sent.get("stats", 0),
                                                "err": oracle.rel_err(out, cp.shard(ref, g, layout=layout)),
                                                "rounds": cp.cp_plan(*loc, pattern, group=g, layout=layout).rounds()}
    return res


def run_rank(rank, world, init, out_dir, worlds=(4, 3, 2)):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    import sparse_attn as sa
    from sparse_attn import distributed as cp

    for w in worlds:
        g = dist.new_group(list(range(w)))  # collective over the whole world, members or not
        if rank >= w:
            continue
        results = {}
        for fn in (attention_cases, linear_cases, delta_cases, cache_cases, traffic_cases):
            try:
                results.update(fn(sa, cp, g, w))
            except Exception:  # reported per group of cases; the test names the failing group
                results[f"crash-{fn.__name__}"] = "error: " + traceback.format_exc()
        with open(os.path.join(out_dir, f"w{w}-rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()

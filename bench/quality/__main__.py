"""`python -m bench.quality`: how close is each sparse pattern to dense attention on a trained model.

1. Train a small decoder (bench/quality/model.py: 2 layers, d_model 128, 4 heads, RoPE) with dense
   attention on multi-query associative recall in filler tokens (bench/quality/task.py), short
   sequences first, then 2K tokens; save it under bench/results/quality/.
2. Evaluate at 2K..16K tokens: task accuracy with each pattern in every layer, and per layer and
   head the dense attention mass inside the keys the pattern visits and the output error against
   dense (bench/quality/measure.py).
3. Fine-tune briefly with a sparse pattern in every layer (forward and backward through
   sparse_attn's kernels) and evaluate again.
4. Write the tables and a plot: docs/quality.md and docs/images/quality-*.png (with --docs).

Seeded: the same command gives the same weights and the same numbers (up to float summation order
on a different thread count). `--smoke` is a seconds-long run of every step at toy sizes (CI).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

import sparse_attn as sa

from .model import Config, Model
from .task import VALUES, VOCAB
from .train import Phase, run_phases

#: the patterns compared (name -> sparse_attn pattern, or ("hybrid", n): the first n layers linear)
def pattern_set(block: int = 64, window: int = 512) -> dict:
    return {"dense": sa.Dense(),
            "topk4": sa.TopK(4, block_size=block), "topk16": sa.TopK(16, block_size=block),
            "topk64": sa.TopK(64, block_size=block),
            # InfLLMv2's selection at topk16's budget (MiniCPM4's kernels scaled to the block: size bs/2,
            # stride bs/4; 2 local blocks; always sparse, where MiniCPM4's dense_len would keep 2K-8K dense)
            "infllmv2-16": sa.InfLLMv2(topk=16, block_size=block, kernel_size=block // 2, kernel_stride=block // 4,
                                       local_blocks=2, dense_len=-1),
            f"window{window}": sa.SlidingWindow(window),
            f"windowlinear{window}": sa.WindowLinear(window),
            "hybrid(L0 linear)": ("hybrid", 1)}


# Sized for the 2-core machine shared by several engineers (load average 15-20 when this ran):
# short sequences carry most of the steps (the induction circuit forms there; the filler is compute
# spent on nothing), then 256 and 2K tokens so the circuit works at the evaluation's first length.
FULL = dict(
    cfg=dict(d_model=128, heads=4, layers=2, mlp=0, token_shift=True),
    train=[Phase(64, 300, 32, 6), Phase(256, 100, 8, 12), Phase(2048, 80, 1, 32)], lr=3e-3,
    finetune=[Phase(2048, 40, 1, 32)], finetune_lr=1e-3, finetune_pattern="topk4",
    lengths=(2048, 4096, 8192, 16384), seqs=1, pairs=32, block=64, window=512)
SMOKE = dict(
    cfg=dict(d_model=32, heads=2, layers=2, mlp=0, token_shift=True),
    train=[Phase(128, 4, 4, 8)], lr=3e-3, finetune=[Phase(256, 2, 2, 8)], finetune_lr=1e-3,
    finetune_pattern="topk4", lengths=(256,), seqs=1, pairs=8, block=32, window=64)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes, seconds (what CI runs)")
    p.add_argument("--out", default="bench/results/quality", help="folder for the model and results.json")
    p.add_argument("--docs", action="store_true", help="also write docs/quality.md's tables and the plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reuse", action="store_true", help="load the trained model from --out instead of training")
    p.add_argument("--lengths", default=None, help="comma-separated evaluation lengths (default 2048,4096,8192,16384)")
    p.add_argument("--no-finetune", action="store_true", help="evaluate the trained model only (with --reuse: "
                   "more lengths for an existing run, in another process)")
    p.add_argument("--seqs", type=int, default=None, help="sequences per evaluation length (default 1: 32 answers)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = dict(SMOKE if args.smoke else FULL)
    if args.lengths:
        spec["lengths"] = tuple(int(n) for n in args.lengths.split(","))
    if args.seqs:
        spec["seqs"] = args.seqs
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    torch.manual_seed(args.seed)
    cfg = Config(vocab=VOCAB, **spec["cfg"])
    model = Model(cfg)
    path = os.path.join(args.out, "model.pt")
    result = {"config": spec["cfg"], "seed": args.seed, "chance": 1 / VALUES, "load_average_start": load0,
              "torch_threads": torch.get_num_threads()}
    if args.reuse and os.path.exists(path):
        model.load_state_dict(torch.load(path))
        log(f"loaded {path}")
        prev = os.path.join(args.out, "results.json")
        if os.path.exists(prev):  # keep the training run's log and time
            old = json.load(open(prev))
            result.update({k: old[k] for k in ("train_log", "train_s") if k in old})
    else:
        log(f"training {sum(p.numel() for p in model.parameters())} parameters with dense attention ...")
        t0 = time.perf_counter()
        result["train_log"] = run_phases(model, spec["train"], lr=spec["lr"], seed=args.seed + 1)
        result["train_s"] = time.perf_counter() - t0
        torch.save(model.state_dict(), path)
        with open(os.path.join(args.out, "results.json"), "w") as f:  # the training's log, kept for --reuse
            json.dump(result, f, indent=1, default=str)
    patterns = pattern_set(spec["block"], spec["window"])
    evaluate_all = _evaluator(spec, patterns, args.seed)
    result["zero_shot"] = evaluate_all(model, "zero-shot")
    dense_acc = result["zero_shot"][str(spec["lengths"][0])]["dense"]["acc"]
    log(f"dense accuracy at {spec['lengths'][0]}: {dense_acc:.3f} (chance {1 / VALUES:.3f})")
    _save(args.out, result, t_start)
    if args.no_finetune:
        return 0

    ft_name = spec["finetune_pattern"]
    ft_pattern = patterns[ft_name]
    log(f"fine-tuning with {ft_pattern!r} in every layer (sparse_attn forward + backward) ...")
    from .measure import mixers_for
    t0 = time.perf_counter()
    result["finetune_log"] = run_phases(model, spec["finetune"], lr=spec["finetune_lr"], seed=args.seed + 2,
                                        mixers=mixers_for(ft_pattern, cfg.layers), label="fine-tune",
                                        log_every=25)
    result["finetune_s"] = time.perf_counter() - t0
    result["finetune_pattern"] = repr(ft_pattern)
    torch.save(model.state_dict(), os.path.join(args.out, f"model-finetuned-{ft_name}.pt"))
    result["finetuned"] = evaluate_all(model, f"after fine-tuning with {ft_name}")
    result["patterns"] = {k: repr(v) for k, v in patterns.items()}
    _save(args.out, result, t_start)
    if args.docs:
        from .report import write_docs
        write_docs(result, spec)
    return 0


def _save(out, result, t_start):
    """results.json with the wall and CPU time so far (written after each stage: a long run
    interrupted keeps what it measured)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(total_s=time.perf_counter() - t_start, load_average_end=os.getloadavg(),
                  cpu_s=me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {out}/results.json ({result['total_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU so far)")


def _evaluator(spec, patterns, seed):
    from .measure import evaluate

    def run(model, label):
        log(f"evaluating ({label}) at {', '.join(map(str, spec['lengths']))} tokens ...")
        t0 = time.perf_counter()
        res = {str(n): evaluate(model, n, patterns, seqs=spec["seqs"], pairs=spec["pairs"], seed=seed + 3, log=log)
               for n in spec["lengths"]}
        log(f"  ({time.perf_counter() - t0:.0f} s)")
        return res
    return run


if __name__ == "__main__":
    sys.exit(main())

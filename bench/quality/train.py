"""Training: a short length curriculum with dense attention, and a fine-tune through a sparse pattern.

The loss is cross-entropy on the answer tokens only (the filler is random: nothing to learn there).
Short sequences first (many steps per second while the induction circuit forms), then the target
length, so the circuit is learned at the length the evaluation starts from. Steps, not wall time,
bound every phase: a run is the same on a busy machine as on a quiet one, only slower.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Model
from .task import make_batch


@dataclass(frozen=True)
class Phase:
    length: int
    steps: int
    batch: int
    pairs: int


def loss_and_accuracy(model: Model, tokens, targets, mixers=None):
    """Mean cross-entropy and accuracy over the scored positions (targets != -100)."""
    pos = (targets != -100).nonzero(as_tuple=False)
    # the same number of answers in every row (make_batch plants `pairs` per sequence)
    p = pos[:, 1].view(tokens.shape[0], -1)
    logits = model(tokens, mixers, positions=p)
    tgt = torch.gather(targets, 1, p)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    acc = (logits.argmax(-1) == tgt).float().mean()
    return loss, acc


def run_phases(model: Model, phases, *, lr: float, seed: int, mixers=None, log_every: int = 50,
               params=None, label: str = "train") -> list[dict]:
    """AdamW; each phase warms up over its first 10% of steps and decays (cosine) to 10% of `lr`
    (one schedule over all phases left the last, longest-sequence phase at a learning rate near 0:
    the model never adapted to 2K tokens). Returns the logged points."""
    g = torch.Generator().manual_seed(seed)
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = sum(ph.steps for ph in phases)
    bounds, start = [], 0
    for ph in phases:
        bounds.append((start, ph.steps))
        start += ph.steps

    def factor(i):
        s0, n = next(((a, b) for a, b in bounds if a <= i < a + b), bounds[-1])
        t = min(i - s0, n) / max(n, 1)
        return min(1.0, (i - s0 + 1) / max(1, n // 10)) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    log, step, t0 = [], 0, time.perf_counter()
    run_loss = run_acc = 0.0
    model.train()
    for ph in phases:
        for _ in range(ph.steps):
            b = make_batch(ph.batch, ph.length, pairs=ph.pairs, generator=g)
            loss, acc = loss_and_accuracy(model, b.tokens, b.targets, mixers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            run_acc += acc.item()
            if step % log_every == 0 or step == total:
                n = (step - 1) % log_every + 1
                point = dict(step=step, length=ph.length, loss=run_loss / n, acc=run_acc / n,
                             seconds=time.perf_counter() - t0)
                log.append(point)
                print(f"  {label} step {step}/{total} len {ph.length}: loss {point['loss']:.3f} "
                      f"acc {point['acc']:.3f} ({point['seconds']:.0f} s)", file=sys.stderr, flush=True)
                run_loss = run_acc = 0.0
    model.eval()
    return log

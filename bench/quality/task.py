"""The synthetic long-context retrieval task: multi-query associative recall in filler.

A sequence of `length` tokens is random filler; `pairs` distinct (key, value) bigrams are planted at
random depths in its first part, and the last `query_span` tokens ask for each of them again: the
key reappears and the model must predict the value that followed it the first time. Only those
value tokens are scored, so chance is `1 / VALUES`. Solving it needs an induction circuit (a
previous-token head, then a head that matches the query key against the keys' successors) over
the whole context: a sparse pattern that drops the block holding the planted pair loses the answer.

Vocabulary: filler `[0, FILLER)`, keys `[FILLER, FILLER + KEYS)`, values after them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FILLER, KEYS, VALUES = 128, 64, 64
VOCAB = FILLER + KEYS + VALUES


@dataclass
class Batch:
    tokens: torch.Tensor   # (B, S) int64
    targets: torch.Tensor  # (B, S) int64: the value to predict at a query key's position, -100 elsewhere
    answer_pos: torch.Tensor  # (B, P) int64: positions of the query keys (where the answer is read)
    pair_pos: torch.Tensor    # (B, P) int64: positions of the planted keys (their first occurrence)


def make_batch(batch: int, length: int, *, pairs: int, query_span: int | None = None,
               generator: torch.Generator) -> Batch:
    """`batch` sequences of `length` tokens with `pairs` planted pairs each (seeded by `generator`).

    The planted pairs sit at distinct even offsets of `[0, length - query_span)` (uniform depth); the
    queries occupy the last `query_span` tokens (default `max(4 * pairs, length // 16)`), in a random
    order, each a (key, value) bigram at a random even offset there.
    """
    if pairs > KEYS:
        raise ValueError(f"pairs must be at most {KEYS} (distinct keys), got {pairs}")
    span = query_span if query_span is not None else max(4 * pairs, length // 16)
    if 2 * pairs > span or 2 * pairs > length - span:
        raise ValueError(f"length {length} is too short for {pairs} pairs and a query span of {span}")
    g = generator
    tokens = torch.randint(0, FILLER, (batch, length), generator=g)
    targets = torch.full((batch, length), -100, dtype=torch.long)
    answer_pos = torch.empty(batch, pairs, dtype=torch.long)
    pair_pos = torch.empty(batch, pairs, dtype=torch.long)
    ctx_slots, q_slots = (length - span) // 2, span // 2
    for b in range(batch):
        keys = FILLER + torch.randperm(KEYS, generator=g)[:pairs]
        vals = FILLER + KEYS + torch.randint(0, VALUES, (pairs,), generator=g)
        first = 2 * torch.randperm(ctx_slots, generator=g)[:pairs]
        second = length - span + 2 * torch.randperm(q_slots, generator=g)[:pairs]
        for pos in (first, second):
            tokens[b, pos] = keys
            tokens[b, pos + 1] = vals
        targets[b, second] = vals  # the prediction at the key's position is the next token
        answer_pos[b], pair_pos[b] = second, first
    return Batch(tokens, targets, answer_pos, pair_pos)

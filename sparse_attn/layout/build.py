"""Build a :class:`BlockLayout` from any pattern, on the device, without host synchronisation.

Every quantity that sizes a tensor (tile counts, list widths) is derived from host integers
(lengths and pattern parameters); everything data-dependent (a `BlockSparse` layout, a TopK
selection) stays on the device.
"""
from __future__ import annotations

import torch

from ..patterns import BlockSparse, Dense, SlidingWindow, TopK, WindowLinear
from ..scheduler.device import check_device
from .block_layout import BlockLayout, compact


def _tile_bounds(sq: int, sk: int, q_block: int, device):
    """Absolute first/last query position of each query tile, int64 `(M,)` each."""
    off = sk - sq
    m0 = off // q_block
    m1 = -(-sk // q_block) if sq > 0 else m0
    tiles = torch.arange(m0, m1, device=device)
    plo = torch.clamp(tiles * q_block, min=off)
    phi = torch.clamp((tiles + 1) * q_block, max=sk) - 1
    return plo, phi


def _classify(plo, phi, jlo, jhi, *, causal: bool, window: int | None, sinks: int):
    """Full / any-visible flags for (query tile, key block) pairs given first/last positions."""
    if causal:
        full = jhi <= plo
        anyv = jlo <= phi
    else:
        full = torch.ones_like(jhi <= plo)
        anyv = full
    if window is not None:
        win_full = jlo > phi - window
        win_any = jhi > plo - window
        full = full & (win_full | (jhi < sinks))
        anyv = anyv & (win_any | (jlo < sinks))
    return full, anyv


def build_layout(pattern, *, batch: int, kv_heads: int, sq: int, sk: int, q_block: int | None = None,
                 k_block: int | None = None, device=None, token_index: torch.Tensor | None = None) -> BlockLayout:
    """Layout of `pattern` for end-aligned queries `Sq <= Sk`.

    `q_block`/`k_block` default to the pattern's block size (required for BlockSparse and TopK,
    whose blocks are defined by the pattern) or 64. For TopK, `token_index` is the per-token
    selection from :func:`sparse_attn.selection.topk_token_index` (forced blocks not included).
    """
    if isinstance(pattern, WindowLinear):
        pattern = pattern.softmax_part
    if q_block is None and k_block is None:
        pattern = pattern.clamped(sk)  # no tile or list sized by a parameter's face value
    blocked = isinstance(pattern, (BlockSparse, TopK))
    default = pattern.block_size if blocked else 64
    q_block = q_block or default
    k_block = k_block or default
    if blocked and (q_block != pattern.block_size or k_block != pattern.block_size):
        raise ValueError(f"{type(pattern).__name__} layouts use q_block = k_block = block_size "
                         f"({pattern.block_size}), got q_block={q_block}, k_block={k_block}")
    device = check_device(device) if device is not None else (
        pattern.layout.device if isinstance(pattern, BlockSparse) else torch.device("cpu"))

    plo, phi = _tile_bounds(sq, sk, q_block, device)
    nb = -(-sk // k_block)
    causal, window, sinks = True, None, 0

    if isinstance(pattern, Dense) or isinstance(pattern, BlockSparse):
        causal = pattern.causal
        ids = torch.arange(nb, device=device)[None, :].expand(plo.shape[0], nb)  # (M, N)
    elif isinstance(pattern, SlidingWindow):
        window, sinks = pattern.window, min(pattern.sinks, sk)
        # candidates: the sink blocks below the window, then the window's own range
        n_sink = -(-sinks // k_block)
        span = (q_block + window - 2) // k_block + 2
        lo = torch.clamp(plo - window + 1, min=0) // k_block
        sink_ids = torch.arange(n_sink, device=device)[None, :].expand(plo.shape[0], n_sink)
        sink_ids = torch.where(sink_ids < lo[:, None], sink_ids, torch.full_like(sink_ids, nb))
        ids = torch.cat([sink_ids, lo[:, None] + torch.arange(span, device=device)[None, :]], dim=1)
    elif isinstance(pattern, TopK):
        # forced blocks: sinks, and the local blocks ending at the tile's own block
        pb = plo // k_block
        n_sink = pattern.sink_blocks
        lo = torch.clamp(pb - pattern.local_blocks + 1, min=0)
        sink_ids = torch.arange(n_sink, device=device)[None, :].expand(plo.shape[0], n_sink)
        sink_ids = torch.where(sink_ids < lo[:, None], sink_ids, torch.full_like(sink_ids, nb))
        ids = torch.cat([sink_ids, lo[:, None] + torch.arange(pattern.local_blocks, device=device)[None, :]], dim=1)
    else:
        raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK, WindowLinear; "
                        f"got {type(pattern).__name__}")

    in_range = (ids >= 0) & (ids < nb)
    safe = torch.clamp(ids, 0, max(nb - 1, 0))
    jlo = safe * k_block
    jhi = torch.clamp((safe + 1) * k_block, max=sk) - 1
    full, anyv = _classify(plo[:, None], phi[:, None], jlo, jhi, causal=causal, window=window, sinks=sinks)
    full, anyv = full & in_range, anyv & in_range
    if isinstance(pattern, BlockSparse):
        lay = pattern.layout[:, :, plo // q_block][..., :nb]  # (B', H', M, N)
        full, anyv = full & lay, anyv & lay
    else:
        full, anyv = full[None, None], anyv[None, None]
    part = anyv & ~full
    width = ids.shape[-1]
    ids4 = ids.expand(full.shape)
    full_count, full_index = compact(full, width, ids4)
    part_count, part_index = compact(part, width, ids4)
    return BlockLayout(sq=sq, sk=sk, q_block=q_block, k_block=k_block, causal=causal, window=window,
                       sink_tokens=sinks, full_count=full_count, full_index=full_index,
                       partial_count=part_count, partial_index=part_index, token_index=token_index)

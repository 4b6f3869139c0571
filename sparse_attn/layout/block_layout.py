"""`BlockLayout`: the one sparse format every softmax kernel consumes.

Query tiles and key blocks are cut at ABSOLUTE positions (multiples of `q_block` / `k_block`),
so that a `BlockSparse` layout, a TopK block id and a decode step all agree on what "block n"
means. With end-aligned queries (`Sq < Sk`) the first query tile may hold fewer than `q_block`
rows; the query tile with local index `i` is absolute tile `q_tile_offset + i`.

Per (batch, kv head, query tile) the layout lists the key blocks to visit, in two sets:

* **full** blocks: every key of the block is visible to every query of the tile, so a kernel
  runs them without any token mask;
* **partial** blocks: some pairs are hidden; a kernel applies the layout's token rule
  `j <= p` (if `causal`) and (`p - j < window` or `j < sink_tokens`) on them.

Counts are int32 `(B', H', M)`; indices int32 `(B', H', M, width)`, ascending, valid entries
first, padding `-1`. `B'`/`H'` are 1 when the pattern is the same for every batch / head.

TopK adds **per-token** blocks: `token_index` int32 `(B, Hkv, Sq, topk)` (ascending, `-1`
padding) holds the blocks selected for each query token beyond the forced ones. They are always
*full* for that token (strictly before its local blocks, never sinks), so a kernel needs no token
mask there, only the per-token membership. The forced blocks (sinks and local) are the same for
every token of a tile and sit in the tile lists above. How kernels iterate the per-token part when
the tokens of one tile select different blocks (design notes, section 1):

* group-centric: one program per (token, kv head) with the `G` query heads of the group as the
  rows of the tile; it walks that token's `token_index` row;
* key-block-centric: `transpose_tokens()` gives per key block the (token) list that selected it;
  partial outputs are merged by log-sum-exp.

The transposed tile lists (per key block, the query tiles that visit it) are derived only when a
backward pass asks for them (`transpose()`), as FlexAttention does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class BlockLayout:
    sq: int
    sk: int
    q_block: int
    k_block: int
    #: token rule applied on partial blocks
    causal: bool
    window: int | None
    sink_tokens: int
    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    token_index: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- shape
    @property
    def q_tile_offset(self) -> int:
        """Absolute index of the first query tile (queries start at position Sk - Sq)."""
        return (self.sk - self.sq) // self.q_block

    @property
    def num_q_tiles(self) -> int:
        return self.full_count.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        return -(-self.sk // self.k_block)

    def q_rows(self, tile: int) -> tuple[int, int]:
        """Local query rows [lo, hi) of local tile `tile`."""
        off = self.sk - self.sq
        a = max((self.q_tile_offset + tile) * self.q_block, off)
        b = min((self.q_tile_offset + tile + 1) * self.q_block, self.sk)
        return a - off, b - off

    # ---------------------------------------------------------------------------------- token rule
    def token_rule(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """The mask applied on partial blocks, `(len(qpos), len(kpos))` bool."""
        q, k = qpos[:, None], kpos[None, :]
        ok = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=qpos.device)
        if self.causal:
            ok = ok & (k <= q)
        if self.window is not None:
            ok = ok & ((q - k < self.window) | (k < self.sink_tokens))
        return ok

    # --------------------------------------------------------------------------------- debugging
    def to_dense(self) -> torch.Tensor:
        """Token-level visibility `(B', H', Sq, Sk)` bool. Debugging only: this IS `Sq x Sk`."""
        dev = self.full_count.device
        bq, bk = self.q_block, self.k_block
        off = self.sk - self.sq
        qpos = torch.arange(off, self.sk, device=dev)
        kpos = torch.arange(self.sk, device=dev)
        qtile = qpos // bq - self.q_tile_offset
        kblk = kpos // bk
        nb = self.num_k_blocks
        full = index_to_bool(self.full_index, nb)  # (B', H', M, N)
        part = index_to_bool(self.partial_index, nb)
        full_tok = full[:, :, qtile][..., kblk]
        part_tok = part[:, :, qtile][..., kblk] & self.token_rule(qpos, kpos)
        vis = full_tok | part_tok
        if self.token_index is not None:
            sel = index_to_bool(self.token_index, nb)[..., kblk]  # (B, Hkv, Sq, Sk)
            vis = vis | sel
        return vis

    def block_mask(self) -> torch.Tensor:
        """`(B', H', M, N)` int8: 2 = full, 1 = partial, 0 = not visited (tile lists only)."""
        nb = self.num_k_blocks
        return (2 * index_to_bool(self.full_index, nb).to(torch.int8)
                + index_to_bool(self.partial_index, nb).to(torch.int8))

    def density(self) -> float:
        """Fraction of all (query, key) pairs that are visited (host sync: debugging/bench only)."""
        if self.sq == 0 or self.sk == 0:
            return 0.0
        return self.to_dense().double().mean().item()

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key block, the query tiles that visit it: `(full_count, full_index, partial_count,
        partial_index)` with shapes `(B', H', N)` and `(B', H', N, M)`; built on the device."""
        nb = self.num_k_blocks
        out = []
        for index in (self.full_index, self.partial_index):
            grid = index_to_bool(index, nb).transpose(-1, -2)  # (B', H', N, M)
            cnt, idx = compact(grid, grid.shape[-1])
            out += [cnt, idx]
        return tuple(out)

    def transpose_tokens(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """TopK's per-token blocks transposed, for dk/dv: per (batch, kv head) the tokens that
        selected each key block, or None without per-token blocks. See `block_token_lists`."""
        if self.token_index is None or self.token_index.shape[-1] == 0 or self.token_index.numel() == 0:
            return None
        return block_token_lists(self.token_index, self.num_k_blocks)

    def __repr__(self) -> str:
        lines = [f"BlockLayout(Sq={self.sq}, Sk={self.sk}, q_block={self.q_block}, k_block={self.k_block}, "
                 f"tiles={self.num_q_tiles}x{self.num_k_blocks}, batch/heads={tuple(self.full_count.shape[:2])}, "
                 f"rule: causal={self.causal} window={self.window} sinks={self.sink_tokens}"
                 + (f", per-token blocks={self.token_index.shape[-1]}" if self.token_index is not None else "")
                 + ")"]
        if self.num_q_tiles * self.num_k_blocks <= 64 * 64 and self.num_q_tiles > 0:
            grid = self.block_mask()[0, 0].cpu()
            chars = {0: ".", 1: "+", 2: "#"}
            lines.append("  [b=0, h=0]  # full  + partial  . skipped"
                         + ("  (per-token TopK blocks not shown)" if self.token_index is not None else ""))
            for row in grid.tolist():
                lines.append("  " + "".join(chars[c] for c in row))
        return "\n".join(lines)


def index_to_bool(index: torch.Tensor, n: int) -> torch.Tensor:
    """int32 index lists `(..., W)` with -1 padding -> bool `(..., n)`."""
    out = torch.zeros(*index.shape[:-1], n + 1, dtype=torch.bool, device=index.device)
    idx = torch.where(index < 0, torch.full_like(index, n), index).long()
    out.scatter_(-1, idx, True)
    return out[..., :n]


def compact(valid: torch.Tensor, width: int, ids: torch.Tensor | None = None):
    """Bool `(..., C)` (candidate `c` is key block `ids[..., c]`, default `c`) -> (count int32
    `(...)`, index int32 `(..., width)` ascending with -1 padding). No host synchronisation:
    `width` is a static bound that the caller derives from the pattern's parameters."""
    c = valid.shape[-1]
    if ids is None:
        ids = torch.arange(c, device=valid.device).expand_as(valid)
    big = torch.iinfo(torch.int32).max
    key = torch.where(valid, ids.to(torch.int32), torch.full_like(ids, big, dtype=torch.int32))
    width = min(width, c)
    if width < c:
        key = torch.topk(key, width, dim=-1, largest=False, sorted=True).values
    else:
        key = torch.sort(key, dim=-1).values
    index = torch.where(key == big, torch.full_like(key, -1), key)
    count = valid.sum(-1, dtype=torch.int32)
    return count, index


def block_token_lists(token_index: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK's per-token blocks transposed, on the device: `token_index` int32 `(B, Hkv, Sq, topk)`
    (-1 padding) -> (`tokens` int32 `(B, Hkv, Sq * topk)` ordered by (block, token), `offsets`
    int32 `(B, Hkv, num_blocks + 1)`: block n's tokens are `tokens[..., offsets[n]:offsets[n + 1]]`;
    padding entries sort after the last block). A stable sort of `Sq * topk` block ids and a batched
    `searchsorted`: no host synchronisation, nothing of size `Sq x Sk`."""
    b, h, sq, topk = token_index.shape
    blocks = token_index.reshape(b, h, sq * topk).to(torch.int64)
    blocks = torch.where(blocks >= 0, blocks, torch.full_like(blocks, num_blocks))
    sorted_blocks, order = torch.sort(blocks, dim=-1, stable=True)  # stable: tokens ascending per block
    tokens = (order // max(topk, 1)).to(torch.int32)
    bounds = torch.arange(num_blocks + 1, device=token_index.device).expand(b, h, num_blocks + 1).contiguous()
    offsets = torch.searchsorted(sorted_blocks.contiguous(), bounds).to(torch.int32)
    return tokens.contiguous(), offsets

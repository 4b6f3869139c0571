"""Pictures of each pattern's mask for the user guide, drawn from sparse_attn itself.

    python -m bench.mask_pictures [--out docs/images] [--tokens 256] [--block 32]

Every picture is `build_layout(pattern, ...).to_dense()` at a small size (TopK with the selection
of `topk_token_index` on random queries and keys), so the pictures show what the kernels compute:

* dark: visible (query, key) pairs;
* light: pairs inside a key block the kernels visit but masked there (partial blocks: the causal
  diagonal, the window's edges);
* orange (WindowLinear): the evicted keys summed by its linear-attention memory.

Rows are query positions p, columns key positions j; thin lines are the layout's query tiles and
key blocks (64 for Dense / SlidingWindow / WindowLinear, the pattern's block_size otherwise).
Writes `mask-<pattern>.png` per pattern and `masks.png` with all of them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

import torch

COLORS = {"hidden": (1.0, 1.0, 1.0), "visited": (0.78, 0.86, 0.95), "visible": (0.12, 0.31, 0.55),
          "memory": (0.96, 0.62, 0.25)}


def _visited_tokens(lay, sq: int, sk: int) -> torch.Tensor:
    """(Sq, Sk) bool: the pair lies in a key block the layout visits for the query's tile or token."""
    bm = lay.block_mask()[0, 0] > 0  # (M, N)
    off = sk - sq
    qtile = torch.arange(off, sk) // lay.q_block - lay.q_tile_offset
    kblk = torch.arange(sk) // lay.k_block
    vis = bm[qtile][:, kblk]
    if lay.token_index is not None:
        from sparse_attn.layout.block_layout import index_to_bool
        sel = index_to_bool(lay.token_index, lay.num_k_blocks)[0, 0]  # (Sq, N)
        vis = vis | sel[:, kblk]
    return vis


def pattern_masks(tokens: int, block: int, seed: int = 0) -> list[tuple[str, str, dict, tuple]]:
    """[(file stem, title, {layer name: (Sq, Sk) bool}, (q_block, k_block))] for every pattern,
    from sparse_attn's layouts (the block sizes are the layout's: lines on the picture)."""
    import sparse_attn as sa
    from sparse_attn.layout.topk_selection import topk_token_index
    s, nb = tokens, math.ceil(tokens / block)
    g = torch.Generator().manual_seed(seed)
    out = []

    def add(stem, title, pattern, token_index=None, memory=None):
        lay = sa.build_layout(pattern, batch=1, kv_heads=1, sq=s, sk=s, token_index=token_index)
        visible = lay.to_dense()[0, 0]
        layers = {"visited": _visited_tokens(lay, s, s) & ~visible, "visible": visible}
        if memory is not None:  # painted over the masked part of visited blocks, under the visible pairs
            layers = {"visited": layers["visited"], "memory": memory, "visible": visible}
        out.append((stem, title, layers, (lay.q_block, lay.k_block)))

    add("dense", "Dense(causal=True)", sa.Dense())
    w, sinks = s // 4, block // 4
    add("sliding-window", f"SlidingWindow(window={w}, sinks={sinks})", sa.SlidingWindow(w, sinks=sinks))
    lay = torch.rand(1, 1, nb, nb, generator=g) < 0.3
    lay = torch.tril(lay | torch.eye(nb, dtype=torch.bool))
    add("block-sparse", f"BlockSparse(30% random causal blocks, block_size={block})", sa.BlockSparse(lay, block_size=block))
    topk = sa.TopK(2, block_size=block, sink_blocks=1, local_blocks=1)
    # queries and keys with a few 'topics', so the selection differs between tokens
    topics = torch.randn(4, 32, generator=g)
    q = (topics[torch.randint(0, 4, (s,), generator=g)] + 0.5 * torch.randn(s, 32, generator=g))[None, None]
    k = (topics[torch.randint(0, 4, (s,), generator=g)] + 0.5 * torch.randn(s, 32, generator=g))[None, None]
    add("topk", "TopK(topk=2, block_size=%d, sink_blocks=1, local_blocks=1), one head" % block, topk,
        token_index=topk_token_index(q, k, topk))
    wl = sa.WindowLinear(w, sinks=0)
    p = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    evicted = (j <= p) & (p - j >= w)  # the contract: keys j <= p the window does not see
    add("window-linear", f"WindowLinear(window={w}): window (softmax) + evicted keys (linear memory)", wl,
        memory=evicted)
    return out


def render(layers: dict) -> torch.Tensor:
    """(Sq, Sk, 3) float RGB in [0, 1]; later layers paint over earlier ones."""
    first = next(iter(layers.values()))
    img = torch.ones(*first.shape, 3)
    for name, m in layers.items():
        img[m] = torch.tensor(COLORS[name])
    return img


def draw(entries, outdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    os.makedirs(outdir, exist_ok=True)
    legend_names = {"visible": "visible", "visited": "in a visited block, masked", "memory": "linear memory (evicted)"}

    def panel(ax, title, layers, blocks):
        s = next(iter(layers.values())).shape
        ax.imshow(render(layers).numpy(), interpolation="nearest", extent=(0, s[1], s[0], 0))
        for t in range(0, s[0] + 1, blocks[0]):
            ax.axhline(t, color="0.85", lw=0.4)
        for t in range(0, s[1] + 1, blocks[1]):
            ax.axvline(t, color="0.85", lw=0.4)
        ax.set_title(textwrap.fill(title, 46), fontsize=8)
        ax.set_xlabel("key position j", fontsize=8)
        ax.set_ylabel("query position p", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(handles=[Patch(color=COLORS[n], label=legend_names[n]) for n in layers],
                  fontsize=6, loc="upper right", framealpha=0.9)

    written = []
    for stem, title, layers, blocks in entries:
        fig, ax = plt.subplots(figsize=(4.2, 4.4))
        panel(ax, title + f" [tiles {blocks[0]}x{blocks[1]}]", layers, blocks)
        fig.tight_layout()
        path = os.path.join(outdir, f"mask-{stem}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, len(entries), figsize=(4.0 * len(entries), 4.4))
    for ax, (stem, title, layers, blocks) in zip(axes, entries):
        panel(ax, title.split(":")[0].split(", one head")[0], layers, blocks)
    fig.tight_layout()
    path = os.path.join(outdir, "masks.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mask_pictures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/images", help="output folder")
    ap.add_argument("--tokens", type=int, default=256, help="query and key length of the pictures")
    ap.add_argument("--block", type=int, default=32, help="block size of BlockSparse / TopK")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    paths = draw(pattern_masks(args.tokens, args.block), args.out)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

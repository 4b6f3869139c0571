"""InfLLMv2's block selection by the C++ kernel (csrc/cpu/infllmv2_select.cpp, extension
"cpu_infllmv2"): what `cpu.block_sparse` runs for an InfLLMv2 pattern before its attention.

The compressed keys (fine, and coarse for `normalizer="coarse"` unless `kernel_size` is a multiple
of the stride: then a coarse window's score is the mean of the scores of the 4 fine windows that
tile it, computed in C++) are built in PyTorch in one pass over K
(`layout.infllmv2_selection.compressed_keys`: float32 stride-row sums), transposed to
`(B, Hkv, D, kernels padded to the vector width)` for the kernel's micro-kernel; the scores, the
group sum, the pooling and the top-k run in C++ chunk by chunk of query rows, with all threads.
Same result as `layout.infllmv2_selection.infllmv2_token_index` (the PyTorch path) up to the
float32 rounding of the scores (tests/test_infllmv2_cpu_select.py).

A decode step over a cache (`infllmv2_picks_over_cache_cpu`, csrc/cpu/infllmv2_decode.cpp) reads
the cache's float32 window sums where they are (row-major, no copy) and returns the same picks as
`layout.infllmv2_selection.infllmv2_picks_over_cache` (tests/test_infllmv2_cache_select.py); sums
kept per page beside vLLM's pages are read through the page table (extension
"cpu_infllmv2_pages", the same C++ file, tests/test_vllm_pages.py)."""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...layout.infllmv2_selection import compressed_keys, num_windows
from ...patterns import InfLLMv2


def _ext():
    return load_extension("cpu_infllmv2")


def unavailable() -> str | None:
    """Why the C++ selection cannot run here (None when it can)."""
    return unavailable_reason(_ext)


def selection_reason(pattern) -> str | None:
    """Why a CPU kernel cannot serve `pattern` for want of this extension (InfLLMv2's selection is a
    second extension beside the kernel's own), or None: for an InfLLMv2 whose extension loads, and for
    every other pattern. A kernel's `extra_reasons` and `preload` both give it."""
    if not isinstance(pattern, InfLLMv2):
        return None
    missing = unavailable()
    return f"InfLLMv2's C++ selection (cpu_infllmv2) is unavailable: {missing}" if missing else None


def _transposed(kc: torch.Tensor, width: int) -> torch.Tensor:
    b, h, n, d = kc.shape
    out = kc.new_zeros(b, h, d, max(width, -(-n // width) * width))
    out[..., :n] = kc.transpose(-1, -2)
    return out


def infllmv2_select_cpu(q: torch.Tensor, k: torch.Tensor, pattern: InfLLMv2) -> torch.Tensor:
    """Per-token picks beyond the forced blocks: int32 `(B, Hkv, Sq, topk)`, ascending, -1 padded,
    rows end-aligned to `Sk` (a sparse call: the caller applies the `dense_len` switch). `q` float32,
    bfloat16 or float16 on the CPU."""
    ks, st = pattern.kernel_size, pattern.kernel_stride
    with torch.no_grad():
        w = _ext().vector_width
        kc = compressed_keys(k.detach(), ks, st, torch.float32)
        coarse = pattern.normalizer == "coarse"
        # kernel_size a multiple of the stride (the models): the coarse scores are means of fine ones
        from_fine = coarse and ks % st == 0
        n2 = num_windows(k.shape[2], 4 * ks, 4 * st) if coarse else 0
        kc2 = compressed_keys(k.detach(), 4 * ks, 4 * st, torch.float32) if coarse and not from_fine else kc[:, :, :0]
        return _ext().infllmv2_select(q.detach(), _transposed(kc, w), _transposed(kc2, w), k.shape[1], k.shape[2],
                                      kc.shape[2], n2, ks, st, pattern.block_size, pattern.topk,
                                      pattern.forced_init, pattern.window_blocks, pattern.variant == "minicpm4.1",
                                      coarse, from_fine)


def _pages_ext():
    return load_extension("cpu_infllmv2_pages")


def pages_unavailable() -> str | None:
    """Why the C++ selection over window sums kept per page cannot run here (None when it can)."""
    return unavailable_reason(_pages_ext)


def _by_page(view):
    """The per-page window sums reader of a view whose sums are kept per page (vLLM's pages:
    `integrations/vllm/pages.PagedWindowSums`), else None."""
    return getattr(view.compressed, "by_page", None)


def native_over_cache(view) -> bool:
    """Whether the C++ decode selection reads this cache's window sums (float32; a float64 cache's
    stay on the PyTorch path, the definition the C++ one is tested against). Sums kept per page
    need the extension that reads them through the page table ("cpu_infllmv2_pages")."""
    if view.compressed is None or view.compressed.dtype != torch.float32 or view.device.type != "cpu":
        return False
    return _by_page(view) is None or pages_unavailable() is None


def infllmv2_picks_over_cache_cpu(q: torch.Tensor, view, pattern: InfLLMv2) -> torch.Tensor:
    """Per-token picks over a cache's read view (`KVView`) from its window sums, each sequence's
    rows end-aligned to its own length: int32 `(B, Hkv, Sq, topk)`, ascending, -1 padded (the
    `picks` of `layout.infllmv2_selection.infllmv2_index_over_cache`, which applies `dense_len`)."""
    ks, st = pattern.kernel_size, pattern.kernel_stride
    coarse = pattern.normalizer == "coarse"
    by_page = _by_page(view)
    if by_page is not None:  # per-page sums, read through the page table where they lie
        fine = by_page(ks, st)
        kc2 = by_page(4 * ks, 4 * st) if coarse else fine
        c = view.compressed
        return _pages_ext().infllmv2_select_pages(q.detach(), fine, kc2, c.page_table, c.page_size,
                                                  list(view.host_lengths), ks, st, pattern.block_size, pattern.topk,
                                                  pattern.forced_init, pattern.window_blocks,
                                                  pattern.variant == "minicpm4.1", coarse)
    fine = view.window_sums(ks, st)
    kc2 = view.window_sums(4 * ks, 4 * st) if coarse else fine[:, :, :0]
    return _ext().infllmv2_select_sums(q.detach(), fine, kc2, list(view.host_lengths), ks, st, pattern.block_size,
                                       pattern.topk, pattern.forced_init, pattern.window_blocks,
                                       pattern.variant == "minicpm4.1", coarse)

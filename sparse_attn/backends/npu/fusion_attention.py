"""Dense and sliding-window attention on Ascend NPUs: `torch_npu.npu_fusion_attention`.

UNTESTED ON HARDWARE. Written from the documented interface (Ascend Extension for PyTorch,
"torch_npu.npu_fusion_attention", e.g. https://www.hiascend.com/document/detail/zh/Pytorch/600/
apiref/apilist/ptaoplist_000850.html):

    npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
        atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
        inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False)
      -> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)

How the contract maps onto it (layout "BNSD" = the SDPA layout; GQA: key/value heads must divide
the query heads, which the contract guarantees; head_num is the query heads):

* `Dense(causal=True)`: `sparse_mode=3` ("rightDownCausal": the causal diagonal ends at the
  bottom-right corner, i.e. queries aligned to the END of the keys, as the contract aligns them)
  with the documented compressed mask, a 2048 x 2048 upper-triangular bool matrix;
* `Dense(causal=False)`: `sparse_mode=0`, no mask;
* `SlidingWindow(W)` without sinks, only for `Sq == Sk` (no alignment question): `sparse_mode=4`
  ("band") with `pre_tockens = W - 1`, `next_tockens = 0` and the same compressed mask.

The log-sum-exp comes from `softmax_max` and `softmax_sum` (`(B, N, Sq, 8)`, float32, the value
repeated over the last axis). The backward pass is torch_npu's own (`npu_fusion_attention` is
differentiable through autograd). Everything else (TopK, BlockSparse, windows with sinks, Sq < Sk
windows) runs on the `reference` backend, which works on `npu` tensors.
"""
from __future__ import annotations

import functools

import torch

from ...patterns import Dense, SlidingWindow
from ...scheduler.kernel import Kernel, roofline_seconds

#: side of the compressed mask that sparse modes 2, 3 and 4 take (documented)
COMPRESSED_MASK = 2048


def _torch_npu():
    import torch_npu  # noqa: F401  (registers the npu device and its ops)

    return torch_npu


@functools.lru_cache(maxsize=4)
def _compressed_mask(device: str) -> torch.Tensor:
    """The documented 2048 x 2048 mask of sparse modes 2-4: True (masked) strictly above the diagonal."""
    return torch.triu(torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool), diagonal=1).to(device)


def fusion_arguments(pattern, sq: int, sk: int) -> dict:
    """The sparse-mode arguments for `pattern` (host integers only)."""
    if isinstance(pattern, Dense):
        return dict(sparse_mode=3, mask=True) if pattern.causal else dict(sparse_mode=0, mask=False)
    if isinstance(pattern, SlidingWindow):
        return dict(sparse_mode=4, mask=True, pre_tockens=pattern.window - 1, next_tockens=0)
    raise TypeError(f"unsupported pattern {type(pattern).__name__}")


def npu_fusion_attention(q, k, v, pattern, *, scale: float):
    """(out, lse) through torch_npu; q/k/v in the SDPA layout ("BNSD")."""
    npu = _torch_npu()
    args = fusion_arguments(pattern, q.shape[2], k.shape[2])
    mask = _compressed_mask(str(q.device)) if args.pop("mask") else None
    res = npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=mask, scale=scale, keep_prob=1.0,
                                   **args)
    out, smax, ssum = res[0], res[1], res[2]
    lse = smax[..., 0].float() + torch.log(ssum[..., 0].float())
    return out, lse


class NpuFusionAttention(Kernel):
    """`torch_npu.npu_fusion_attention` for Dense and sliding windows (untested on hardware)."""

    name = "npu.fusion_attention"
    backend = "npu"
    devices = ("npu",)
    dtypes = (torch.float16, torch.bfloat16)
    patterns = (Dense, SlidingWindow)
    head_dims = (16, 256)
    supports_backward = True
    #: of the device's nominal peak over the visited pairs: a guess until measured on an NPU
    efficiency = 0.4

    def unavailable(self):
        try:
            _torch_npu()
        except Exception as e:  # ImportError, or a broken CANN install
            return f"torch_npu is not usable here ({type(e).__name__}: {e})"
        return None

    def extra_reasons(self, p):
        why = []
        if p.head_dim != p.v_head_dim:
            why.append("npu_fusion_attention needs Dv == D")
        if p.head_dim % 16:
            why.append(f"head dim {p.head_dim} is not a multiple of 16")
        pat = p.pattern
        if isinstance(pat, SlidingWindow):
            if pat.sinks:
                why.append("sliding window with sinks: not expressible as a band")
            if p.sq != p.sk:
                why.append("sliding window with Sq != Sk: the band's alignment is not documented precisely enough")
        if p.is_empty or p.sk == 0:
            why.append("empty input")
        return why

    def cost(self, p):
        flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs() * (3.5 if p.requires_grad else 1.0)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * p.kv_heads * p.sk * (p.head_dim + p.v_head_dim)
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.efficiency, overhead_s=30e-6)

    def run(self, q, k, v, p, *, gate=None, sink_logits=None):
        return npu_fusion_attention(q, k, v, p.pattern, scale=p.scale)[0]

"""InfLLMv2's C++ selection (csrc/cpu/infllmv2_select.cpp) against the PyTorch selection and the
float64 evaluation of the contract: every config (both variants, both normalisers, kernel size not
twice the stride, local_blocks=0), odd lengths, Sq < Sk, GQA 1 to 16, bfloat16 queries."""
import pytest
import torch

import infllmv2_oracle as O
import sparse_attn as sa
from sparse_attn.backends.cpu.infllmv2 import infllmv2_select_cpu, unavailable
from sparse_attn.layout.infllmv2_selection import infllmv2_token_index
from test_infllmv2 import CONFIGS, check_selection, draw, full_selection

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"cpu_infllmv2: {unavailable()}")


@pytest.mark.parametrize("i, name", list(enumerate(CONFIGS)), ids=list(CONFIGS))
def test_cpp_selection_equals_oracle_and_pytorch(i, name):
    check_selection(infllmv2_select_cpu, i, name)


def test_cpp_selection_gqa16_bfloat16_and_the_scheduler_uses_it():
    pattern = CONFIGS["41-coarse"]
    q, k, v = draw(pattern, (1, 16, 1, 37, 141), 64, min_margin=1e-5)
    qb, kb = q.bfloat16(), k.bfloat16()
    p = pattern.clamped(141)
    # bfloat16 q is read as it sits (converted in registers): the PyTorch path on the same values
    assert torch.equal(infllmv2_select_cpu(qb, kb, p), infllmv2_token_index(qb.float(), kb.float(), p))
    text = sa.plan(q, k, v, pattern).explain()
    assert "cpu.block_sparse" in text
    out = sa.attention(q, k, v, pattern, backend="cpu")
    torch.testing.assert_close(out, sa.attention(q, k, v, pattern, backend="reference"), rtol=2e-5, atol=2e-5)


def test_rows_without_visible_kernels_still_pick_the_lowest_blocks():
    """Early rows see no (coarse) kernel: every score is 0 and ties go to the lower blocks."""
    pattern = sa.InfLLMv2(topk=4, block_size=8, kernel_size=32, kernel_stride=8, init_blocks=0, local_blocks=1,
                          dense_len=-1)
    q, k = torch.randn(2, 4, 60, 16), torch.randn(2, 2, 60, 16)
    got = infllmv2_select_cpu(q, k, pattern)
    assert torch.equal(got, infllmv2_token_index(q, k, pattern))
    assert torch.equal(full_selection(got, pattern, 60, 60).expand(2, 2, -1, -1), O.select_blocks(q, k, pattern))

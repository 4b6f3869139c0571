"""The C++/CUDA extensions: one table read by the JIT loader and by setup.py (no torch import here).

name -> sources (relative to csrc/), headers they include (for the cache key), compiler and
linker flags, and flags for just-in-time builds only (`-march=native` there stands for this
machine's instruction-set target: `target.py` resolves it, explicitly on aarch64). An entry with
`"cuda": True` has .cu sources compiled by nvcc with `cuda_cflags`; it is built only where torch
has CUDA (the JIT loader and setup.py skip it elsewhere; CI compiles its .cu files with nvcc alone,
tests/test_cuda_build.py).
"""

EXTENSIONS = {
    "cpu": {
        "sources": ["cpu/block_sparse_fwd.cpp", "cpu/block_sparse_bwd.cpp", "cpu/topk_select.cpp"],
        "headers": ["cpu/vec.h", "cpu/vec_bf16.h", "cpu/scalar.h", "cpu/layout_check.h", "cpu/token_blocks.h",
                    "cpu/huge_pages.h", "cpu/target_check.h", "cpu/vec_bf16_neon.h", "cpu/softcap.h", "cpu/prefetch.h",
                    "cpu/amx.h", "cpu/gemm_amx.h", "cpu/flush_to_zero.h", "cpu/out_check.h", "cpu/dtype_tag.h",
                    "cpu/partial_rows.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        # only in JIT builds, which run where they are built
        "jit_cflags": ["-march=native"],
    },
    "cpu_decode": {
        # topk_select.cpp: TopK's selection from a cache's block sums (topk_select_sums), beside the kernel;
        # page_write.cpp: a serving loop's new rows into their page slots (write_page_rows)
        "sources": ["cpu/decode.cpp", "cpu/decode_binding.cpp", "cpu/topk_select.cpp", "cpu/page_write.cpp"],
        "headers": ["cpu/scalar.h", "cpu/vec.h", "cpu/vec_bf16.h", "cpu/decode_bf16.h", "cpu/amx.h", "cpu/decode_amx.h", "cpu/decode_direct.h",
                    "cpu/decode_int8.h", "cpu/decode_int8_neon.h", "cpu/decode_fp8.h", "cpu/decode_plan.h",
                    "cpu/decode_rows.h", "cpu/decode_f32.h", "cpu/decode_f32_avx512.h", "cpu/decode_softmax.h", "cpu/target_check.h",
                    "cpu/vec_bf16_neon.h", "cpu/decode_bf16_neon.h", "cpu/quant_rows.h", "cpu/decode_quant.h",
                    "cpu/softcap.h", "cpu/prefetch.h", "cpu/reuse_clock.h", "cpu/score_tree.h", "cpu/stream_ahead.h",
                    "cpu/flush_to_zero.h", "cpu/out_check.h", "cpu/dtype_tag.h", "cpu/decode_kcols.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cpu_infllmv2": {  # InfLLMv2's block selection (the attention is the "cpu" extension's)
        # infllmv2_decode.cpp: the selection of a few rows over a cache's window sums
        "sources": ["cpu/infllmv2_select.cpp", "cpu/infllmv2_decode.cpp"],
        "headers": ["cpu/vec.h", "cpu/scalar.h", "cpu/target_check.h", "cpu/infllmv2_rows.h", "cpu/dtype_tag.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cpu_infllmv2_pages": {  # InfLLMv2's decode selection over window sums kept per page (vLLM's pages)
        "sources": ["cpu/infllmv2_decode.cpp", "cpu/infllmv2_pages_binding.cpp"],
        "headers": ["cpu/vec.h", "cpu/scalar.h", "cpu/target_check.h", "cpu/infllmv2_rows.h", "cpu/dtype_tag.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cpu_linear": {
        "sources": ["cpu/linear.cpp", "cpu/linear_bwd.cpp"],
        "headers": ["cpu/vec.h", "cpu/scalar.h", "cpu/huge_pages.h", "cpu/linear_common.h", "cpu/target_check.h",
                    "cpu/prefetch.h", "cpu/dtype_tag.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cpu_step": {  # decode steps against constant-size state: linear attention and WindowLinear
        "sources": ["cpu/linear_step.cpp", "cpu/window_linear_step.cpp", "cpu/step_binding.cpp"],
        "headers": ["cpu/vec.h", "cpu/scalar.h", "cpu/step_common.h", "cpu/target_check.h", "cpu/dtype_tag.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cpu_delta": {
        "sources": ["cpu/delta.cpp", "cpu/delta_bwd.cpp"],
        "headers": ["cpu/vec.h", "cpu/scalar.h", "cpu/huge_pages.h", "cpu/linear_common.h", "cpu/delta_common.h",
                    "cpu/target_check.h", "cpu/dtype_tag.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
    "cuda": {
        "sources": ["cuda/paged_decode.cu", "cuda/paged_decode_binding.cpp"],
        "headers": ["cuda/paged_decode.cuh"],
        "cflags": [],
        "ldflags": [],
        "cuda": True,
        # Ampere and Hopper; the JIT build adds the running GPU's own architecture
        "cuda_cflags": ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90,code=sm_90"],
    },
}

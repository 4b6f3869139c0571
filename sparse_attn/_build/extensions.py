"""The C++/CUDA extensions: one table read by the JIT loader and by setup.py (no torch import here).

name -> sources (relative to csrc/), headers they include (for the cache key), compiler and
linker flags, and flags for just-in-time builds only (e.g. -march=native).
"""

EXTENSIONS = {
    "cpu": {
        "sources": ["cpu/block_sparse_fwd.cpp"],
        "headers": ["cpu/vec.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        # only in JIT builds, which run where they are built
        "jit_cflags": ["-march=native"],
    },
    "cpu_decode": {
        "sources": ["cpu/decode.cpp"],
        "headers": ["cpu/vec.h"],
        "cflags": ["-fopenmp"],
        "ldflags": ["-fopenmp"],
        "jit_cflags": ["-march=native"],
    },
}

"""The C++/CUDA extensions: one table read by the JIT loader and by setup.py (no torch import here).

name -> sources (relative to csrc/), headers they include (for the cache key), extra flags.
"""

EXTENSIONS = {
    "cpu": {
        "sources": ["cpu/block_sparse_fwd.cpp"],
        "headers": [],
        "cflags": ["-fopenmp"],
    },
}

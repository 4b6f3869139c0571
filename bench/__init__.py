"""Benchmark suite of sparse_attn: `python -m bench [--quick]` from the repository root."""

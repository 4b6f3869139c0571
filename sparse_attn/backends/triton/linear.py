"""Chunked linear attention and WindowLinear in Triton."""

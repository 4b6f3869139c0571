"""The attention patterns of the contract, one frozen dataclass per file."""
from .base import Pattern
from .block_sparse import BlockSparse
from .dense import Dense
from .infllmv2 import InfLLMv2
from .sliding_window import SlidingWindow
from .topk import TopK
from .window_linear import WindowLinear

SOFTMAX_PATTERNS = (Dense, SlidingWindow, BlockSparse, TopK)

__all__ = ["Pattern", "Dense", "SlidingWindow", "BlockSparse", "TopK", "WindowLinear", "InfLLMv2", "SOFTMAX_PATTERNS"]

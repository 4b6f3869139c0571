"""The block-layout format shared by every softmax kernel, and its builder."""
from .block_layout import BlockLayout, compact, index_to_bool
from .build import build_layout

__all__ = ["BlockLayout", "build_layout", "compact", "index_to_bool"]

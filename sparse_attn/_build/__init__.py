"""Building the C++/CUDA extensions: just in time on first use, or ahead of time in setup.py."""
from .jit import ExtensionBuildError, csrc_dir, load_extension, unavailable_reason

__all__ = ["ExtensionBuildError", "csrc_dir", "load_extension", "unavailable_reason"]

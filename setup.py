"""sparse_attn: hardware-aware long-context attention kernels for PyTorch.

`pip install -e .` installs the Python package only; the C++/CUDA extensions under csrc/ are
compiled just in time on first use and cached. For an ahead-of-time build, which needs torch in
the build environment:

    SPARSE_ATTN_BUILD_EXT=1 pip install --no-build-isolation .

This file imports torch only in that case, so a plain install never pulls a second torch build.
"""
import os
import runpy
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (as sparse_attn/_csrc) so a wheel can still JIT-build."""

    def run(self):
        super().run()
        if self.editable_mode if hasattr(self, "editable_mode") else False:
            return
        dst = Path(self.build_lib) / "sparse_attn" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


def ext_modules():
    if os.environ.get("SPARSE_ATTN_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    table = runpy.run_path(str(ROOT / "sparse_attn" / "_build" / "extensions.py"))["EXTENSIONS"]
    mods = []
    for name, spec in table.items():
        if spec.get("cuda"):
            if torch.version.cuda is None:
                continue  # a CPU build of torch: the CUDA kernels report themselves unavailable
            mods.append(CUDAExtension(f"sparse_attn._ext_{name}", [f"csrc/{s}" for s in spec["sources"]],
                                      include_dirs=[str(ROOT / "csrc")],
                                      extra_compile_args={"cxx": ["-O3", "-std=c++17"] + spec["cflags"],
                                                          "nvcc": spec["cuda_cflags"]}))
            continue
        mods.append(CppExtension(f"sparse_attn._ext_{name}", [f"csrc/{s}" for s in spec["sources"]],
                                 include_dirs=[str(ROOT / "csrc")],
                                 extra_compile_args=["-O3", "-std=c++17"] + spec["cflags"],
                                 extra_link_args=spec.get("ldflags", [])))
    return mods, {"build_ext": BuildExtension}


mods, cmds = ext_modules()
setup(
    name="sparse_attn",
    version="0.1.0",
    description="Block-sparse, sliding-window and linear-attention kernels for long contexts (PyTorch)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]),
    python_requires=">=3.10",
    # torch is required but deliberately not pinned: install the build you want (CPU or CUDA) first.
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "build": ["ninja", "pybind11"], "test": ["pytest"]},
    # vLLM calls it in each of its processes; it acts only when SPARSE_ATTN_VLLM_PATTERN is set
    entry_points={"vllm.general_plugins": ["sparse_attn = sparse_attn.integrations.vllm:register"]},
    ext_modules=mods,
    cmdclass={"build_py": BuildPyWithSources, **cmds},
)

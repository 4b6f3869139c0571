"""An extension built from another git revision, importable beside the working tree's, for kernel
A/B runs in one process (the VM's speed drifts between processes: compare two builds call by call).

    from bench.build_ab import load_revision
    old = load_revision("HEAD")          # csrc/ of HEAD, the "cpu" extension
    new = sparse_attn.backends.cpu.kernels._ext()   # the working tree's

Why a module name of its own: a second `sparse_attn_cpu.so` loaded from another path with
`importlib.util.spec_from_file_location("sparse_attn_cpu", path)` is *the same module object* as
the first one imported (CPython keeps single-phase extension modules by name), so such an "A/B"
times one build against itself and its "same bits" check cannot fail. Here the revision's csrc/ is
extracted with `git archive` and built by torch's `cpp_extension.load` as `sparse_attn_<ext>_ab_<rev>`
(its PyInit symbol differs), with the flags of the just-in-time build (`_build/extensions.py`), in
the cache folder ($SPARSE_ATTN_CACHE). `load_revision` refuses a module that is the working tree's.
"""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

from sparse_attn._build.extensions import EXTENSIONS
from sparse_attn._build.jit import cache_root, load_extension
from sparse_attn._build.target import resolve

ROOT = Path(__file__).resolve().parent.parent


def load_revision(rev: str, ext: str = "cpu", *, verbose: bool = False):
    """The extension `ext` built from `rev`'s csrc/ under a module name of its own."""
    from torch.utils.cpp_extension import load

    if ext not in EXTENSIONS:
        raise ValueError(f"ext must be one of {sorted(EXTENSIONS)}, got {ext!r}")
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    src = cache_root() / f"ab-src-{sha}"
    if not (src / "csrc").is_dir():
        blob = subprocess.run(["git", "archive", "--format=tar", sha, "csrc"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(src, filter="data")
    spec = EXTENSIONS[ext]
    build = cache_root() / f"ab-{ext}-{sha}"
    build.mkdir(parents=True, exist_ok=True)
    print(f"[build_ab] {ext} of {rev} ({sha}) in {build}", file=sys.stderr)
    mod = load(name=f"sparse_attn_{ext}_ab_{sha}", sources=[str(src / "csrc" / s) for s in spec["sources"]],
               extra_cflags=["-O3", "-std=c++17"] + spec["cflags"] + resolve(spec.get("jit_cflags", [])),
               extra_ldflags=list(spec.get("ldflags", [])), extra_include_paths=[str(src / "csrc")],
               build_directory=str(build), verbose=verbose)
    if mod is load_extension(ext) or Path(mod.__file__).resolve() == Path(load_extension(ext).__file__).resolve():
        raise RuntimeError(f"load_revision({rev!r}): got the working tree's module back, not a second build")
    return mod

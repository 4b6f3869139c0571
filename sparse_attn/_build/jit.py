"""Just-in-time build of the `csrc/` extensions, cached between runs.

`load_extension(name, sources)` returns the compiled module. It looks first for an
ahead-of-time build (`sparse_attn._ext_<name>`, made by `SPARSE_ATTN_BUILD_EXT=1 pip install .`),
then builds with `torch.utils.cpp_extension.load` + ninja into a cache folder whose name encodes
the sources' content, the flags and the torch version, so a change to any of them rebuilds and
an unchanged tree never does. torch's own file baton serialises concurrent builds of one name.

Importing `sparse_attn` never compiles anything: a kernel calls this on first use (or when the
scheduler asks whether it is available), and a failure raises `ExtensionBuildError` whose message
says what failed; the kernel then reports "unavailable: ..." in `plan(...).explain()`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
import threading
from pathlib import Path

import torch

from .extensions import EXTENSIONS
from .target import resolve

_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}
_FAILED: dict[str, str] = {}


class ExtensionBuildError(RuntimeError):
    """A C++/CUDA extension could not be built or loaded."""


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: $SPARSE_ATTN_CSRC, the repo's csrc/ (editable install),
    or the copy that setup.py puts inside the installed package."""
    env = os.environ.get("SPARSE_ATTN_CSRC")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if cand.is_dir():
            return cand
    raise ExtensionBuildError("the C++/CUDA sources (csrc/) are not installed with this copy of sparse_attn")


def cache_root() -> Path:
    env = os.environ.get("SPARSE_ATTN_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_attn"
    return base / f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"


def cpu_signature() -> str:
    """The host CPU as a JIT build targets it (-march=native): architecture, model name and the
    instruction-set flags. Part of the cache key, so a cache shared between machines (an NFS home,
    a container image) never loads a build that uses instructions this CPU lacks."""
    import platform

    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "cpu part") and not model:
                    model = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = " ".join(sorted(val.split()))
                if model and flags:
                    break
    except OSError:  # not Linux: the processor string is the best we have
        model = platform.processor()
    return f"{platform.machine()}|{model}|{flags}"


def _digest(paths: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for f in flags:
        h.update(f.encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def load_extension(name: str, *, verbose: bool | None = None):
    """Compile (once) and import the extension `name` of the table in `extensions.py`."""
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        if name in _FAILED:
            raise ExtensionBuildError(_FAILED[name])
        try:
            mod = importlib.import_module(f"sparse_attn._ext_{name}")  # ahead-of-time build
        except ImportError:
            try:
                if os.environ.get("SPARSE_ATTN_DISABLE_JIT") == "1":
                    raise ExtensionBuildError("just-in-time builds are disabled (SPARSE_ATTN_DISABLE_JIT=1)")
                spec = EXTENSIONS[name]
                mod = _jit(name, spec["sources"], spec["cflags"] + resolve(spec.get("jit_cflags", [])),
                           spec.get("ldflags", []), spec["headers"], verbose,
                           cuda_cflags=spec.get("cuda_cflags", []))
            except ExtensionBuildError as e:
                _FAILED[name] = f"C++ extension '{name}' unavailable: {e}"
                raise ExtensionBuildError(_FAILED[name]) from e
            except Exception as e:  # compiler missing, compile error, ABI mismatch ...
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                errs = [ln for ln in lines if "error" in ln.lower()][:6] or lines[-6:]
                msg = (f"C++ extension '{name}' failed to build ({type(e).__name__}): " + " | ".join(errs)
                       + " -- set SPARSE_ATTN_VERBOSE_BUILD=1 for the full compiler output")
                _FAILED[name] = msg
                # said once per process: the scheduler then plans without the kernels that need it,
                # which can be many times slower, and explain() is the only other place it shows
                print(f"[sparse_attn] {msg}; kernels that need it are skipped (a plan's explain() shows "
                      "what runs instead)", file=sys.stderr)
                raise ExtensionBuildError(msg) from e
        _LOADED[name] = mod
        return mod


def _jit(name, sources, extra_cflags, ldflags, headers, verbose, cuda_cflags=()):
    from torch.utils.cpp_extension import load

    root = csrc_dir()
    paths = [root / s for s in sources]
    deps = paths + [root / h for h in headers]
    for p in deps:
        if not p.is_file():
            raise ExtensionBuildError(f"missing source {p}")
    flags = ["-O3", "-std=c++17"] + list(extra_cflags)
    key = flags + list(ldflags) + list(cuda_cflags)
    if any(f.startswith("-march=native") or f.startswith("-mcpu=native") for f in key):
        key.append(cpu_signature())  # the build is only valid on this CPU model
    build_dir = cache_root() / f"{name}-{_digest(deps, key)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if verbose is None:
        verbose = os.environ.get("SPARSE_ATTN_VERBOSE_BUILD") == "1"
    if not verbose and not any(build_dir.glob(f"sparse_attn_{name}*.so")):
        print(f"[sparse_attn] building C++ extension '{name}' in {build_dir} (first use only)", file=sys.stderr)
    with _build_lock(build_dir):
        return load(name=f"sparse_attn_{name}", sources=[str(p) for p in paths], extra_cflags=flags,
                    extra_ldflags=list(ldflags), extra_cuda_cflags=list(cuda_cflags) or None,
                    extra_include_paths=[str(root)], build_directory=str(build_dir), verbose=verbose)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One process at a time in a build folder, by an OS file lock that dies with its holder.

    torch's own lock (`build_dir/lock`, a file whose existence is the lock) is left behind when a
    process is killed while it holds it, and every later process then waits on it forever (seen
    with test runs stopped by a timeout). Under this lock no other sparse_attn process is inside
    `load`, so a torch lock file found here is such a leftover: it is removed, with a message."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(build_dir / ".sparse_attn.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                print(f"[sparse_attn] removing a stale build lock left by a killed process: {stale}", file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def unavailable_reason(loader) -> str | None:
    """Why `loader()` (a function returning a loaded extension) cannot give one here, as the
    scheduler's reason text; None when it loads. Builds on first call, then cached by the loader."""
    try:
        loader()
    except ExtensionBuildError as e:
        return str(e)
    return None

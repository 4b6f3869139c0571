"""Which device to benchmark, and a description of the machine for the JSON report."""
from __future__ import annotations

import datetime
import os
import platform
import sys

import torch


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return torch.npu.is_available()


def detect_device(requested: str | None = None) -> torch.device:
    """`requested` wins; otherwise CUDA GPU, then NPU, then CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if npu_available():
        return torch.device("npu")
    return torch.device("cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, " \
           f"{torch.backends.cpu.get_cpu_capability()})"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def git_commit() -> str | None:
    """HEAD of the repository the bench runs from, '+dirty' when the tree has changes (read only)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torch_npu": _version("torch_npu"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # other work on the machine skews the timings
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
    }

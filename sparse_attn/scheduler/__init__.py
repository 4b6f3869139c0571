"""The scheduler: problems, kernel declarations, the registry and `plan()`."""
from .device import DeviceInfo, device_info
from .kernel import Kernel, roofline_seconds
from .plan import Candidate, Plan, choose
from .preload import preload
from .problem import Problem, make_problem
from .registry import kernels, register

__all__ = ["DeviceInfo", "device_info", "Kernel", "roofline_seconds", "Candidate", "Plan", "choose",
           "Problem", "make_problem", "kernels", "preload", "register"]

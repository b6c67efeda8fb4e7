"""Test helpers for vhostkit: a throwaway VM with a real kernel for the vhost kernel tests.

See :mod:`vhostkit.testing.kernel_vm` (imported lazily, so that ``python3 -m
vhostkit.testing.kernel_vm`` does not import it twice).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GUEST_ENV_VAR",
    "KernelVm",
    "PreparedKernel",
    "VmBootError",
    "VmError",
    "VmPrepareError",
    "VmResult",
    "VmTimeout",
    "default_cache_dir",
    "prepare",
    "run_in_vm",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("vhostkit.testing.kernel_vm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Switch triton to its interpreter on machines without a CUDA GPU — before anything imports it.

triton's `jit` decides between compiling and interpreting when a kernel is defined, and its own
library functions (tl.sum, tl.cumsum, ...) are defined when triton is first imported; torch
imports triton as a side effect of its compiler modules. So this runs first in `import moe_lab`.
Without a GPU triton cannot compile anything, so nothing else in the process loses by it; with a
GPU nothing changes. Set TRITON_INTERPRET yourself to decide otherwise.
"""
import importlib.util
import os
import sys

import torch


def prepare_interpreter() -> None:
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


prepare_interpreter()

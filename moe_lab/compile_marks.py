"""torch.compile's marks for moe_lab's functions, set without importing torch._dynamo at `import moe_lab`.

`torch.compiler.assume_constant_result` imports torch._dynamo, about half the time of `import moe_lab` on a small
machine, paid by every notebook kernel and command line whether it compiles or not, only to set one attribute on
the function, which dynamo reads when it traces a call. Here the attribute is set directly while dynamo is
not loaded yet, and torch's own decorator runs once it is. `tests/test_compile.py` holds the two to the same
result, so a torch that marks functions another way fails there rather than silently breaking graphs.
"""
from __future__ import annotations

import sys

import torch

#: What torch._dynamo.assume_constant_result sets on the function (seen in torch 2.11, 2.13 and 2.14;
#: tests/test_compile.py compares it with torch's own decorator in whichever torch is installed).
CONSTANT_RESULT_MARK = "_dynamo_marked_constant"


def assume_constant_result(fn):
    """`torch.compiler.assume_constant_result(fn)`: under torch.compile a call of `fn` is run once while tracing
    and its result kept as a constant (guarded by the inputs dynamo sees), instead of being traced."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    return mark_constant_result(fn)


def mark_constant_result(fn):
    """The mark alone, as torch._dynamo.assume_constant_result sets it."""
    setattr(fn, CONSTANT_RESULT_MARK, True)
    return fn

"""Kernel tests: on the CPU every Triton kernel runs under the Triton interpreter.

NOTE: triton 3.6 reads TRITON_INTERPRET when @triton.jit decorates a function, i.e. when the kernel
modules are imported, not at launch. So the variable is set here, before any test module imports
them; if something imported them earlier without it (kernels built for a GPU), they are dropped so
that the next import rebuilds them for the interpreter.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _common = sys.modules.get("rstitch_engine.kernels.common")
    if _common is not None and not _common.INTERPRET:
        for _name in [n for n in sys.modules if n.startswith("rstitch_engine.kernels")]:
            del sys.modules[_name]

"""The numbers the C++ scheduler, the kernels and the Python side exchange, each defined once.

Model ids and result flags are the scheduler's (csrc/scheduler.h `Model`, csrc/plan_layout.h `ResultFlag`):
this module mirrors them and checks the mirror against the built extension `_C` when imported, so a stale
build fails here, not as wrong tokens. Random streams are the kernels' own (rstitch_kernels/random.py): each
consumer of counter-based noise owns one, so no two draw the same numbers. All are ints, usable as Triton
constexprs (`tl.constexpr(ResultFlag.NAN.value)`).
"""
from enum import IntEnum, IntFlag

from . import _C

INT32_MAX = 2**31 - 1  # the scheduler's integers (ids, counts, lengths, seeds' stream keys)


class Model(IntEnum):
    SLM = 0
    LLM = 1


class ResultFlag(IntFlag):
    KEEP = 1      # the row's token is committed
    NEXT_LLM = 2  # the next position is the LLM's
    NAN = 4       # the row's logits had a NaN or +inf: token -1, entropy NaN


class Stream(IntEnum):
    STITCH = 0         # stitch-step sampling (Gumbel-max)
    SPEC_ACCEPT = 1    # speculative decoding: accept draft j with min(1, q/p); forced acceptance rates
    SPEC_RESAMPLE = 2  # speculative decoding: resample the first rejected position
    ROUTER = 3         # R-Stitch+ router: sampled keep/switch decisions


SLM, LLM = Model.SLM, Model.LLM
MODELS = tuple(Model)

for _name, _value in (("SLM", Model.SLM), ("LLM", Model.LLM), ("KEEP", ResultFlag.KEEP),
                      ("NEXT_LLM", ResultFlag.NEXT_LLM), ("NAN", ResultFlag.NAN)):
    if getattr(_C, _name) != _value:
        raise ImportError(f"rstitch_engine._C says {_name} = {getattr(_C, _name)}, protocol.py says {int(_value)}: "
                          "the extension is stale; rebuild it (pip install -e .)")

"""Helpers shared by the kernel files: implementation dispatch, device facts, a portable dot, and the
last-arrival counters that let a split kernel merge its own partial results (one launch, not two)."""
import functools
import os

import torch
import triton
import triton.language as tl

# NOTE: triton 3.6 reads TRITON_INTERPRET when @triton.jit decorates a function, i.e. when the kernel
# modules are imported, so this records the mode every kernel of the package was built in.
INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


def _fix_interpreter_index() -> None:
    """The triton 3.6 interpreter turns scalars (1-element arrays) into loop bounds with int(array),
    which numpy >= 2.4 rejects for arrays with a dimension; give it .item() instead."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "index_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.index_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_index()


def use_triton(device: torch.device) -> bool:
    """True where the Triton launchers can run: CUDA, or the CPU under the Triton interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(INTERPRET) and os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in on the CPU so split paths get exercised."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@triton.jit
def dot(a, b):
    """tl.dot with float32 accumulation; float32 operands stay full precision (no tf32)."""
    if INTERPRET:
        # NOTE: the triton 3.6 interpreter multiplies bf16 dot operands as their raw uint16 bits.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        product = tl.dot(a, b, input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


# NOTE: one buffer of counters per device, all zero between launches (the last arrival resets its own), so
# kernels queued on one stream share it; kernels on concurrent streams must not (the engine runs every step
# on one stream). Allocated once, at the first split launch (a warm-up, never a graph capture), and never
# replaced: captured graphs hold its address. The largest user is a split GEMV: one counter per N tile.
COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's int32 counters (all zero), at least `n` of them, for `last_arrival`."""
    if n > COUNTERS:
        raise ValueError(f"a split launch needs {n} arrival counters, more than the {COUNTERS} there are: "
                         f"use fewer, larger tiles")
    buf = _counters.get(device)
    if buf is None:
        buf = _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return buf


@triton.jit
def last_arrival(counter_ptr, arrivals):
    """True in the last of the `arrivals` programs that call this on one counter, which it resets to 0 for
    the next launch. That program merges the partial results the others stored: the atomic is acq_rel, so
    their stores (released by their own arrival) are visible to it."""
    # NOTE: the barriers order every thread's stores of this program before its arrival, and the last
    # program's loads after it (the atomic itself is one thread's).
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    tl.store(counter_ptr, 0, mask=last)
    tl.debug_barrier()
    return last

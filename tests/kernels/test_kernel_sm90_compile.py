"""Every kernel compiles for an H100 (sm_90a) through its launcher, also on a machine without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile_check.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    if result.returncode == 2:
        pytest.skip(f"this triton cannot compile without a device here:\n{report[-2000:]}")
    assert result.returncode == 0, report[-4000:]
    kernels = [line for line in result.stdout.splitlines() if " regs=" in line]
    assert kernels and all(" local=0" in line for line in kernels), "register spills:\n" + "\n".join(kernels)
    # spills may also show as stack: the attention kernels (their split merge included, and the head dims
    # 8, 16 and 80 of the padded tiles), the stitch step and the step's other per-token kernels use none
    no_stack = [line for line in kernels if line.startswith(("_decode", "_extend", "_stitch", "_embed", "_rope",
                                                             "_rms_norm"))]
    assert len({line.split()[0] for line in no_stack}) == 6, "\n".join(kernels)
    assert all(" stack=0" in line for line in no_stack), "\n".join(no_stack)

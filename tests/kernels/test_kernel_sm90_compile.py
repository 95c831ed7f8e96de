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
    # spills may also show as stack: the attention kernels (their split reduce included, and the head dims
    # 8, 16 and 80 of the padded tiles) use none
    attention = [line for line in kernels if line.startswith(("_decode", "_extend"))]
    assert attention and all(" stack=0" in line for line in attention), "\n".join(attention)

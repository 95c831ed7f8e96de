"""R-Stitch+ (docs/method.md, 'R-Stitch+: router', 'R-Stitch+: latency estimator', 'R-Stitch+: DAPO training'):
the learned router, its device path, the latency estimator and its calibration, and DAPO training."""
from .calibrate import CPU_GRID, CUDA_GRID, Grid, calibrate, default_grid, profile
from .dapo import train_router
from .device import DecisionRecorder, Decisions, DeviceRouter
from .latency import LatencyModel, Timing
from .model import FEATURES, Router
from .rollouts import (Rollout, Task, evaluate, run_rollouts, score, summarize_rollouts,
                       word_problems)

__all__ = [
    "CPU_GRID", "CUDA_GRID", "DecisionRecorder", "Decisions", "DeviceRouter", "FEATURES", "Grid", "LatencyModel",
    "Rollout", "Router", "Task", "Timing", "calibrate", "default_grid", "evaluate", "profile", "run_rollouts", "score",
    "summarize_rollouts", "train_router", "word_problems",
]

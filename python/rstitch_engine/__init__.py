"""rstitch-engine: hybrid small/large language-model decoding (R-Stitch) over two paged KV caches."""
from . import policies
from .api import Engine
from .engine_config import EngineConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "policies"]
__version__ = "0.1.0"

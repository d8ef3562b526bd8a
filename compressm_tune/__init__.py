"""compressm-tune: in-training compression of state-space models (CompreSSM), tuned to hardware."""

from compressm_tune.errors import CompressmError

__version__ = "0.1.0"

__all__ = ["CompressmError", "__version__"]

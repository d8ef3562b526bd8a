"""compressm-tune: in-training compression of state-space models (CompreSSM), tuned to hardware."""

from compressm_tune.errors import CompressmError

__version__ = "0.1.0"

__all__ = ["Compressor", "CompressmError", "__version__"]


def __getattr__(name: str):
    """``compressm_tune.Compressor`` without importing torch for ``import compressm_tune``."""
    if name == "Compressor":
        from compressm_tune.reduction import Compressor

        return Compressor
    raise AttributeError(f"module 'compressm_tune' has no attribute {name!r}")

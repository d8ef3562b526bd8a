"""SSM layers and networks: the LRU, selective and Mamba layers, the blocks, the network, the
config, and the Hugging Face Mamba import."""

from compressm_tune.models._scan import kernel_available, linear_scan, scan_reference, torch_scans
from compressm_tune.models.config import ARCHS, SSMConfig, dropout_for
from compressm_tune.models.hf import from_hf_mamba
from compressm_tune.models.lru import LRULayer
from compressm_tune.models.mamba import MambaLayer
from compressm_tune.models.network import (
    SELECTIVE_LAYERS,
    SSM_PARAMETERS,
    MambaBlock,
    SSMBlock,
    SSMModel,
)
from compressm_tune.models.selective import (
    SelectiveLayer,
    selective_scan,
    selective_scan_reference,
)

__all__ = [
    "ARCHS",
    "LRULayer",
    "MambaBlock",
    "MambaLayer",
    "SELECTIVE_LAYERS",
    "SSMBlock",
    "SSMConfig",
    "SSMModel",
    "SSM_PARAMETERS",
    "SelectiveLayer",
    "dropout_for",
    "from_hf_mamba",
    "kernel_available",
    "linear_scan",
    "scan_reference",
    "selective_scan",
    "selective_scan_reference",
    "torch_scans",
]

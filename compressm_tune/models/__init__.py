"""SSM layers and networks: the LRU, selective, Mamba and Mamba-2 layers, the blocks, the
network, the config, and Hugging Face Mamba and Mamba-2 models in (an instance or a folder) and
out (a folder)."""

from compressm_tune.models._scan import kernel_available, linear_scan, scan_reference, torch_scans
from compressm_tune.models.config import ARCHS, MAMBA_ARCHS, SSMConfig, dropout_for
from compressm_tune.models.hf import from_hf_mamba, from_hf_mamba2
from compressm_tune.models.hf_folder import (
    HF_MODEL_TYPES,
    STATE_SIZES_KEY,
    check_hf_output,
    from_hf_folder,
    is_hf_folder,
    save_hf_folder,
)
from compressm_tune.models.lru import LRULayer
from compressm_tune.models.mamba import MambaLayer
from compressm_tune.models.mamba2 import MAMBA2_SCANS, Mamba2Layer, check_mamba2_scan, ssd_scan
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
    "HF_MODEL_TYPES",
    "LRULayer",
    "MAMBA2_SCANS",
    "MAMBA_ARCHS",
    "MambaBlock",
    "Mamba2Layer",
    "MambaLayer",
    "SELECTIVE_LAYERS",
    "SSMBlock",
    "SSMConfig",
    "SSMModel",
    "SSM_PARAMETERS",
    "STATE_SIZES_KEY",
    "SelectiveLayer",
    "check_hf_output",
    "check_mamba2_scan",
    "dropout_for",
    "from_hf_folder",
    "from_hf_mamba",
    "from_hf_mamba2",
    "is_hf_folder",
    "kernel_available",
    "save_hf_folder",
    "linear_scan",
    "scan_reference",
    "selective_scan",
    "selective_scan_reference",
    "ssd_scan",
    "torch_scans",
]

"""SSM layers and networks: the LRU and selective layers, the block, the network, the config."""

from compressm_tune.models._scan import kernel_available, linear_scan, scan_reference
from compressm_tune.models.config import ARCHS, SSMConfig
from compressm_tune.models.lru import LRULayer
from compressm_tune.models.network import SSM_PARAMETERS, SSMBlock, SSMModel
from compressm_tune.models.selective import (
    SelectiveLayer,
    selective_scan,
    selective_scan_reference,
)

__all__ = [
    "ARCHS",
    "LRULayer",
    "SSMBlock",
    "SSMConfig",
    "SSMModel",
    "SSM_PARAMETERS",
    "SelectiveLayer",
    "kernel_available",
    "linear_scan",
    "scan_reference",
    "selective_scan",
    "selective_scan_reference",
]

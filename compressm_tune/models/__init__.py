"""SSM layers and networks: the LRU layer, its block, the network and their config."""

from compressm_tune.models._scan import kernel_available, linear_scan, scan_reference
from compressm_tune.models.config import SSMConfig
from compressm_tune.models.lru import SSM_PARAMETERS, LRULayer
from compressm_tune.models.network import LRUBlock, SSMModel

__all__ = [
    "LRUBlock",
    "LRULayer",
    "SSMConfig",
    "SSMModel",
    "SSM_PARAMETERS",
    "kernel_available",
    "linear_scan",
    "scan_reference",
]

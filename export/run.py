#!/usr/bin/env python3
"""Edge runner for compressm-tune bundles: needs only numpy + onnxruntime.

This launcher runs the runner that ships inside the package
(``compressm_tune/exporter/_edge.py``) straight from its file, without importing the
``compressm_tune`` package (so torch is never imported). Every exported bundle carries a copy of
the same file as ``run.py``; on a device, use that copy: ``python3 BUNDLE/run.py --help``.

    python3 export/run.py BUNDLE --input x.npy [--stream] [--bench] [--threads 1]
"""

import runpy
import sys
from pathlib import Path

_RUNNER = Path(__file__).resolve().parent.parent / "compressm_tune" / "exporter" / "_edge.py"

if __name__ == "__main__":
    if not _RUNNER.is_file():
        sys.exit(f"run.py: error: {_RUNNER} not found; on a device use the run.py inside the "
                 "bundle folder (it is the same runner)")
    runpy.run_path(str(_RUNNER), run_name="__main__")

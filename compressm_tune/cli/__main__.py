"""``python -m compressm_tune.cli``: the console script."""

import sys

from compressm_tune.cli import main

sys.exit(main())

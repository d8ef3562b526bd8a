"""Build the optional C scan kernel; everything else is declared in pyproject.toml.

The extension is `optional`: where no C compiler (or no OpenMP) is present the install still
succeeds and `compressm_tune.models` falls back to its pure-PyTorch chunked scan.
"""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "compressm_tune.models._scan_kernel",
            sources=["compressm_tune/models/_scan_kernel.c"],
            # -fno-trapping-math: lets GCC vectorize the branch-free clamps in the selective
            # scan's exp (nothing here reads floating-point exception flags)
            extra_compile_args=["-O3", "-fno-trapping-math", *openmp],
            extra_link_args=openmp,
            optional=True,
        )
    ]
)

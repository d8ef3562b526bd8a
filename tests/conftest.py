"""Shared fixtures: a per-session dataset cache and numpy references for the LRU equations.

The references are written from DESIGN.md alone (complex128 numpy, a plain loop over time), so
tests that compare the package against them do not trust any of the package's own maths.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (numpy on the CPU): it must be
# switched on before triton is first imported. With a GPU they compile and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _row_scan(self, input):
    """Triton's interpreter folds ``tl.associative_scan`` one scalar at a time through the
    combine function (~1 ms per element: minutes for one 1000-step test). This is the same
    left fold along the scan axis, applied to whole slices of the other axes at once: the
    kernel code and the fold order per lane are unchanged, only the Python loop is shorter."""
    data = [arg.handle.data for arg in input]
    out = [np.empty_like(d) for d in data]

    def at(i):
        return tuple(i if k == self.axis else slice(None) for k in range(data[0].ndim))

    for o, d in zip(out, data, strict=True):
        o[at(0)] = d[at(0)]
    for i in range(1, data[0].shape[self.axis]):
        acc = [self.to_tensor(o[at(i - 1)], arg.dtype) for o, arg in zip(out, input, strict=True)]
        cur = [self.to_tensor(d[at(i)], arg.dtype) for d, arg in zip(data, input, strict=True)]
        ret = self.combine_fn.fn(*acc, *cur)
        for o, r in zip(out, ret if isinstance(ret, tuple) else (ret,), strict=True):
            o[at(i)] = r.handle.data
    return [self.to_tensor(o, arg.dtype) for o, arg in zip(out, input, strict=True)]


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:  # no triton: its tests skip
        _interpreter = None
    if _interpreter is not None and hasattr(_interpreter, "ScanOps"):
        _interpreter.ScanOps.generic_scan = _row_scan


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Run tests single-threaded: on a loaded 2-core machine OpenMP's spinning threads make
    tiny ops 100x slower. Tests that are about threads set them explicitly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Point ``COMPRESSM_CACHE`` at a fresh folder for the whole session.

    mnist1d is generated at most once per session (the first load writes the cache, later loads
    read it), and no test writes into the user's ``~/.cache``. Subprocesses inherit the variable.
    """
    cache = tmp_path_factory.mktemp("compressm-cache")
    old = os.environ.get("COMPRESSM_CACHE")
    os.environ["COMPRESSM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("COMPRESSM_CACHE", None)
    else:
        os.environ["COMPRESSM_CACHE"] = old


@pytest.fixture(scope="session")
def mnist1d(session_cache):
    """The mnist1d dataset, generated once into the session cache."""
    from compressm_tune.data import load_dataset

    return load_dataset("mnist1d")


@pytest.fixture(scope="session")
def lti_sysid(session_cache):
    """The lti-sysid regression dataset (cheap; shared so tests need not rebuild it)."""
    from compressm_tune.data import load_dataset

    return load_dataset("lti-sysid")


@pytest.fixture
def keep_threads():
    """Restore torch's intra-op thread count after a test that may change it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- references


def np_scan(lam, v, x0=None, reverse=False):
    """``x_t = lam * x_{t-1} + v_t`` in complex128 by a plain loop.

    lam (N,) complex, v (B, L, N) complex, x0 (B, N) complex or None. With ``reverse`` the
    loop runs t = L-1 .. 0 and ``x0`` is the state "after" the end: x_t = lam x_{t+1} + v_t.
    """
    lam = np.asarray(lam, dtype=np.complex128)
    v = np.asarray(v, dtype=np.complex128)
    x = np.zeros_like(v)
    state = np.zeros_like(v[:, 0]) if x0 is None else np.asarray(x0, np.complex128).copy()
    steps = range(v.shape[1] - 1, -1, -1) if reverse else range(v.shape[1])
    for t in steps:
        state = lam * state + v[:, t]
        x[:, t] = state
    return x


def to_complex(t: torch.Tensor) -> np.ndarray:
    """A real ``(..., 2)`` tensor of (re, im) pairs as a complex128 array ``(...)``."""
    a = t.detach().double().numpy()
    return a[..., 0] + 1j * a[..., 1]


def lru_system_np(layer):
    """(lam, B, C, D) of an LRULayer from its raw parameters, per DESIGN.md, in float64."""
    p = {k: v.detach().double().numpy() for k, v in layer.named_parameters()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))  # (N,)
    b = (p["B_re"] + 1j * p["B_im"]) * np.exp(p["gamma_log"])[:, None]  # (N, H)
    c = p["C_re"] + 1j * p["C_im"]  # (H, N)
    return lam, b, c, p["D"]


def lru_reference(layer, u, x0=None):
    """y_k = Re(C x_k) + D u_k with x_k = lam x_{k-1} + B u_k; u (B, L, H) -> y (B, L, H)."""
    lam, b, c, d = lru_system_np(layer)
    u = np.asarray(u, dtype=np.float64)
    batch, length, _ = u.shape
    state = np.zeros((batch, lam.shape[0]), np.complex128) if x0 is None else x0.copy()
    y = np.empty_like(u)
    for k in range(length):
        state = lam * state + u[:, k] @ b.T  # (B, N)
        y[:, k] = (state @ c.T).real + d * u[:, k]
    return y


def small_trainer(data, out, arch: str, d_model: int, state_dims: list[int], reducer=None,
                  steps: int = 20):
    """A quick Trainer over ``data`` (batch 32, evaluation every 10 steps, one thread)."""
    from compressm_tune.models import SSMConfig
    from compressm_tune.training import TrainConfig, Trainer

    cfg = SSMConfig(arch=arch, d_input=data.d_input, d_output=data.d_output, d_model=d_model,
                    state_dims=state_dims)
    tcfg = TrainConfig(steps=steps, batch_size=32, eval_every=10, seed=0, threads=1)
    return Trainer(cfg, tcfg, data, out, reducer=reducer, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A throwaway PostgreSQL server on loopback, run as the ``postgres`` user (one per test
    module: tests keep apart by study name). Skips where the server or psycopg is missing."""
    pytest.importorskip("psycopg")
    bins = [shutil.which("initdb")] + sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = next((str(b) for b in bins if b), None)
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb) not installed")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    runner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"],
                                                             capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to run the server")
        runner = ["runuser", "-u", "postgres", "--"]
    data = Path(f"/tmp/compressm-pg-{os.getpid()}-{time.time_ns()}")
    data.mkdir()
    if runner:
        shutil.chown(data, "postgres")
    port = _free_port()
    init = subprocess.run([*runner, initdb, "-D", str(data / "db"), "-A", "trust", "-U", "tune"],
                          capture_output=True, text=True)
    if init.returncode:
        pytest.skip(f"initdb failed: {init.stderr.strip()[:200]}")
    start = subprocess.run(
        [*runner, pg_ctl, "-D", str(data / "db"), "-w", "-t", "30", "-l", str(data / "log"),
         "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
        capture_output=True, text=True)
    if start.returncode:
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[:200]}")
    yield f"postgresql://tune@127.0.0.1:{port}/postgres"
    subprocess.run([*runner, pg_ctl, "-D", str(data / "db"), "-m", "fast", "stop"],
                   capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    """A real profile of this machine at the shape the search tests tune (H=8, 1 block, L=40)."""
    from compressm_tune.hardware import ProfilerConfig, profile_device, save_profile

    profile = profile_device(ProfilerConfig(
        device="cpu", runtime="torch", widths=(1, 4, 16, 64), hidden=8, blocks=1, seq_len=40,
        min_time_s=0.02, rounds=1, min_repeats=3, warmup=1, threads=1), progress=False)
    return save_profile(profile, tmp_path_factory.mktemp("prof") / "here.json")

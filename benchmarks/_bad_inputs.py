"""The bad inputs of ``sweep_bad_input.py``: each case's command line (or API code), the
damage done to the user's files first, and the exit status it must end with."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Case:
    """One bad input: a command line (``argv``, the CLI's; ``"RUNPY"`` first: the bundle's
    run.py) or Python code (``api``), run in a folder prepared by ``setup``."""

    group: str
    name: str
    argv: list[str] | None = None
    api: str | None = None
    expect: tuple[int, ...] = (2,)
    setup: Callable[[Path], None] | None = None
    lock: str | None = None  # a folder another live process holds the run lock of
    interrupt: tuple[str, int] | None = None  # (path that appears, signal to send then)
    rerun: list[str] | None = None  # must then finish (exit 0): the run is resumable
    race: bool = False  # two copies at once
    writes: tuple[str, ...] = ()  # user paths the command may change (prefixes)
    timeout: float = 180.0


TRAIN = ["train", "--dataset", "npz", "--data", "d.npz", "--blocks", "1", "--hidden", "8",
         "--state-dim", "8", "--steps", "4", "--eval-every", "2", "--no-progress", "--out", "run"]
EXPORT = ["export", "model.pt", "--out", "b", "--format", "onnx", "--chunk", "scan"]
PROFILE = ["profile", "--widths", "4,8", "--rounds", "1", "--min-time-s", "0.01", "--warmup",
           "1", "--min-repeats", "1", "--hidden", "8", "--blocks", "1", "--seq-len", "8",
           "--extra-blocks", "2", "-q", "--out", "new.json"]
COMPARE = ["compare", "profile.json", "profile2.json"]
JOB = ["-q", "--trials", "1", "--steps", "10", "--no-baseline", "--profile", "profile.json",
       "--no-drift-check", "--out", "job"]
BUDGET = ["--budget", "0.8x"]


# ----------------------------------------------------------------------------- damage


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:int(len(data) * keep)])
    return do


def _flip(name: str, at: float) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        i = int(len(data) * at)
        for k in range(i, min(i + 16, len(data))):
            data[k] ^= 0xFF
        (d / name).write_bytes(bytes(data))
    return do


def _text(name: str, text: str = "not what it should be\n") -> Callable[[Path], None]:
    def do(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return do


def _npz(name: str, **arrays) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        np.savez(d / name, **arrays)
    return do


def _npy(name: str, array) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        np.save(d / name, array, allow_pickle=True)
    return do


def _copy(src: str, dst: str) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        (d / dst).parent.mkdir(parents=True, exist_ok=True)
        if (d / src).is_dir():
            shutil.copytree(d / src, d / dst)
        else:
            shutil.copy(d / src, d / dst)
    return do


def _python(code: str) -> Callable[[Path], None]:
    """Setup that needs torch: run ``code`` in the case folder."""
    def do(d: Path) -> None:
        here = os.getcwd()
        os.chdir(d)
        try:
            exec(code, {})
        finally:
            os.chdir(here)
    return do


def _json(name: str, value) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        (d / name).write_text(json.dumps(value))
    return do


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def do(d: Path) -> None:
        for step in steps:
            step(d)
    return do


def _edit_profile(name: str, edit: str) -> Callable[[Path], None]:
    """``edit``: a Python statement on ``p`` (the profile's JSON)."""
    def do(d: Path) -> None:
        p = json.loads((d / name).read_text())
        exec(edit, {"p": p, "nan": float("nan")})
        (d / name).write_text(json.dumps(p))
    return do


COMPRESSOR = ("import torch\nfrom compressm_tune import Compressor\n"
              "from compressm_tune.training import model_from_checkpoint\n"
              "m = model_from_checkpoint('model.pt')\no = torch.optim.AdamW(m.parameters())\n")
HOSTILE = ("import torch\nclass R:\n    def __reduce__(self):\n        return (print, ('PWNED',))\n"
           "torch.save({'model': R()}, 'model.pt', _use_new_zipfile_serialization=False)")
NAN_WEIGHTS = ("import torch\np = torch.load('model.pt', weights_only=True)\n"
               "sd = p['model']\nk = next(k for k, v in sd.items() if v.is_floating_point())"
               "\nsd[k].fill_(float('nan'))\ntorch.save(p, 'model.pt')")


# ----------------------------------------------------------------------------- the cases


def _flag_cases(group: str, base: list[str], flags: dict[str, list[str]],
                setup=None, expect=(2,)) -> list[Case]:
    return [Case(group, f"{flag} {value}", [*base, flag, value], setup=setup, expect=expect)
            for flag, values in flags.items() for value in values]


def cases() -> list[Case]:
    out: list[Case] = []
    # --- train: flags
    out += _flag_cases("train", TRAIN, {
        "--steps": ["0", "-1", "abc", "1.5", "nan"], "--batch-size": ["0", "-2", "inf"],
        "--eval-every": ["0", "-1"], "--blocks": ["0", "-1"], "--hidden": ["0", "-8"],
        "--state-dim": ["0", "-4", "100000000"], "--threads": ["0", "-1"],
        "--lr": ["-1", "0", "nan", "inf", "-inf", "abc"], "--weight-decay": ["-1", "nan", "inf"],
        "--ssm-lr-factor": ["0", "-1", "nan", "inf"], "--warmup": ["-0.1", "1", "1.5", "nan"],
        "--dropout": ["-0.1", "1", "1.5", "nan", "inf"],
        "--val-fraction": ["0", "1", "-0.5", "nan", "1.5"], "--seed": ["-1", "abc"],
        "--reduce": ["tau=2", "tau=-1", "tau=nan", "tau=inf", "rank=0", "rank=-3", "rank=abc",
                     "fraction=1.5", "fraction=0", "fraction=nan", "bogus", "tau=", ""],
        "--device": ["bogus", "cuda", "cuda:7", ""], "--schedule": ["bogus"],
        "--select": ["bogus"], "--weighting": ["bogus"],
    })
    out += _flag_cases("train", [*TRAIN, "--reduce", "tau=0.1"], {
        "--window": ["-0.1", "0", "1.5", "nan", "inf"], "--every": ["0", "-1"],
        "--max-drop": ["-1", "inf", "nan"], "--recover": ["-0.1", "1", "nan", "abc"]})
    # --- train: paths and files
    tr = [a for a in TRAIN]
    i = tr.index("d.npz")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 12, 1)).astype(np.float32)
    bad_data = {
        "missing": None, "folder": None, "text": _text("bad.npz"),
        "wrong keys": _npz("bad.npz", a=x, b=np.zeros(50)),
        "nan x": _npz("bad.npz", x=np.full_like(x, np.nan), y=np.zeros(50, int)),
        "empty x": _npz("bad.npz", x=x[:0], y=np.zeros(0, int)),
        "x/y lengths differ": _npz("bad.npz", x=x, y=np.zeros(7, int)),
        "1-D x": _npz("bad.npz", x=x[:, 0, 0], y=np.zeros(50, int)),
        "object x (pickle)": _npz("bad.npz", x=np.array([object()] * 50, dtype=object),
                                  y=np.zeros(50, int)),
        "truncated npz": _both(_copy("d.npz", "bad.npz"), _truncate("bad.npz")),
    }
    for name, setup in bad_data.items():
        path = {"missing": "nothere.npz", "folder": "folder"}.get(name, "bad.npz")
        out.append(Case("train", f"--data {name}", [*tr[:i], path, *tr[i + 1:]], setup=setup))
    out += [
        Case("train", "--dataset npz without --data",
             [a for a in TRAIN if a not in ("--data", "d.npz")]),
        Case("train", "--data-dir with lti-sysid", ["train", "--data-dir", "folder", "--steps",
                                                    "2"]),
        Case("train", "--out an existing file", [*TRAIN, "--out", "notes.txt"]),
        Case("train", "--out under a file", [*TRAIN, "--out", "notes.txt/run"]),
        Case("train", "--out unwritable (/proc)", [*TRAIN, "--out", "/proc/compressm-run"]),
        Case("train", "--resume without last.pt", [*TRAIN, "--resume"],
             setup=lambda d: (d / "run").mkdir()),
    ]
    for name, damage in {"truncated": _truncate("run/last.pt"),
                         "flipped header": _flip("run/last.pt", 0.0),
                         "flipped middle": _flip("run/last.pt", 0.5),
                         "text": _text("run/last.pt"), "empty": _text("run/last.pt", "")}.items():
        out.append(Case("train", f"--resume, last.pt {name}", [*TRAIN[:-1], "run", "--resume"],
                        setup=_both(_copy("run0", "run"), damage)))
    out += [
        Case("train", "--resume another shape", [*TRAIN, "--out", "run0", "--hidden", "16",
                                                  "--resume"], writes=()),
        Case("train", "--resume another dataset", ["train", "--dataset", "lti-sysid",
                                                   "--blocks", "1", "--hidden", "8",
                                                   "--state-dim", "8", "--steps", "4",
                                                   "--out", "run0", "--resume"]),
        Case("train", "a run holds the --out lock", TRAIN, lock="run"),
        Case("train", "--out a finished run, without --resume", [*TRAIN, "--out", "run0"],
             expect=(0, 2)),
        Case("train", "--out a folder of the user's files", [*TRAIN, "--out", "folder"],
             setup=_text("folder/mine.txt"), expect=(0, 2)),
        Case("train", "interrupted (SIGINT), then --resume", [*TRAIN[:-7], "--steps", "400",
             "--eval-every", "2", "--no-progress", "--out", "run"], expect=(130,),
             interrupt=("run/last.pt", signal.SIGINT), rerun=[*TRAIN[:-7], "--steps", "400",
             "--eval-every", "2", "--no-progress", "--out", "run", "--resume"],
             writes=("run",)),
        Case("train", "two runs into one --out at once", [*TRAIN[:-7], "--steps", "40",
             "--eval-every", "2", "--no-progress", "--out", "run"], race=True,
             expect=(0, 2), writes=("run",)),
    ]
    # --- export
    for name, damage in {
        "missing": None, "folder": None, "text": _text("model.pt"), "empty": _text("model.pt", ""),
        "truncated": _truncate("model.pt"), "flipped header": _flip("model.pt", 0.0),
        "flipped middle": _flip("model.pt", 0.5),
        "zip, not a checkpoint": lambda d: shutil.make_archive(str(d / "z"), "zip", d / "folder")
        and os.replace(d / "z.zip", d / "model.pt"),
        "a dict without the keys": _python("import torch; torch.save({'a': 1}, 'model.pt')"),
        "hostile pickle": _python(HOSTILE), "NaN weights": _python(NAN_WEIGHTS),
        "a dataset file": _copy("d.npz", "model.pt"),
    }.items():
        path = {"missing": "nothere.pt", "folder": "folder"}.get(name, "model.pt")
        out.append(Case("export", f"checkpoint {name}", ["export", path, *EXPORT[2:]],
                        setup=damage))
    out += [
        Case("export", "--out an existing file", [*EXPORT, "--out", "notes.txt"]),
        Case("export", "--out under a file", [*EXPORT, "--out", "notes.txt/b"]),
        Case("export", "--out unwritable (/proc)", [*EXPORT, "--out", "/proc/compressm-b"]),
        Case("export", "--out a folder of the user's files", [*EXPORT, "--out", "folder"],
             setup=_text("folder/mine.txt"), expect=(0, 2)),
        Case("export", "--out the bundle already there (replaced: allowed)",
             [*EXPORT, "--out", "bundle"], expect=(0, 2), writes=("bundle",)),
    ]
    out += _flag_cases("export", EXPORT, {
        "--format": ["bogus", "", "onnx,bogus"], "--mode": ["bogus", ""],
        "--opset": ["0", "12", "25", "abc"], "--quantize": ["bogus"],
        "--chunk": ["0", "-1", "abc"], "--threads": ["0", "-1"],
        "--tolerance": ["-1", "nan", "inf"]})
    out += _flag_cases("export", [*EXPORT, "--bench"], {"--min-time-s": ["-1", "nan", "inf"]})
    # --- profile
    out += _flag_cases("profile", PROFILE, {
        "--hidden": ["0", "-1"], "--blocks": ["0"], "--seq-len": ["0", "-5"], "--batch": ["0"],
        "--throughput-batch": ["0"], "--threads": ["0", "-1"],
        "--min-time-s": ["-1", "nan", "inf"], "--warmup": ["-1"], "--min-repeats": ["0"],
        "--rounds": ["0", "-1"], "--watts-per-core": ["-1", "nan", "inf"],
        "--widths": ["", "0", "-4", "a,b", "4,,8"], "--extra-blocks": ["0", "-1", "x"],
        "--energy": ["nvml"], "--device": ["cuda", "bogus"], "--runtime": ["bogus"],
        "--seed": ["abc"]})
    out += [
        Case("profile", "--out an existing profile", [*PROFILE, "--out", "profile.json"]),
        Case("profile", "--out a folder", [*PROFILE, "--out", "folder"]),
        Case("profile", "--out unwritable (/proc)", [*PROFILE, "--out", "/proc/p.json"]),
        Case("profile", "--out under a file", [*PROFILE, "--out", "notes.txt/p.json"]),
    ]
    for name, (path, setup) in {
        "missing": ("nothere.json", None), "folder": ("folder", None),
        "text": ("notes.txt", None), "a JSON list": ("bad.json", _json("bad.json", [1, 2])),
        "truncated": ("profile.json", _truncate("profile.json")),
        "empty": ("profile.json", _text("profile.json", "")),
    }.items():
        out.append(Case("profile", f"--check {name}", ["profile", "--check", path, "-q"],
                        setup=setup))
    # --- compare
    for name, setup in {
        "missing": None, "folder": None, "text": _text("profile2.json"),
        "empty": _text("profile2.json", ""), "truncated": _truncate("profile2.json"),
        "a JSON list": _json("profile2.json", [1, 2]), "an empty object": _json(
            "profile2.json", {}),
        "NaN latencies": _edit_profile("profile2.json",
                                       "[r['latency'].update(p50_ms=nan) for r in p['records']]"),
        "no records": _edit_profile("profile2.json", "p['records'] = []"),
        "records without latency": _edit_profile(
            "profile2.json", "[r.pop('latency') for r in p['records']]"),
    }.items():
        path = {"missing": "nothere.json", "folder": "folder"}.get(name, "profile2.json")
        out.append(Case("compare", f"profile {name}", ["compare", "profile.json", path],
                        setup=setup))
    for flag in ("--plot", "--markdown"):
        ext = ".png" if flag == "--plot" else ".md"
        out += [Case("compare", f"{flag} a folder", [*COMPARE, flag, "folder"]),
                Case("compare", f"{flag} unwritable (/proc)", [*COMPARE, flag, f"/proc/c{ext}"]),
                Case("compare", f"{flag} under a file", [*COMPARE, flag, f"notes.txt/c{ext}"]),
                Case("compare", f"{flag} into a missing folder (made: allowed)",
                     [*COMPARE, flag, f"nothere/c{ext}"], expect=(0, 2))]
    out += _flag_cases("compare", COMPARE, {"--tolerance": ["-1", "nan", "inf"]})
    # --- the budgeted job
    out += _flag_cases("job", JOB, {
        "--budget": ["0", "1", "1.5", "-0.4x", "nanx", "infx", "abc", ""],
        "--budget-ms": ["0", "-1", "nan", "inf", "abc"]})
    out.append(Case("job", "both budgets", [*JOB, *BUDGET, "--budget-ms", "1"]))
    out += _flag_cases("job", [*JOB, *BUDGET], {
        "--budget-mj": ["-1", "nan"], "--trials": ["0", "-1"], "--steps": ["0"],
        "--blocks": ["0"], "--hidden": ["0"], "--state-dims": ["", "0", "a", "-4"],
        "--val-fraction": ["0", "1", "nan"], "--threads": ["0"], "--device": ["bogus", "cuda"],
        "--latency-mode": ["bogus"], "--arch": ["bogus"], "--seed": ["abc"],
        "--storage": ["journal:notes.txt", "journal:folder", "journal:/proc/j.log",
                      "sqlite:///notes.txt", "sqlite:///folder", "bogus://x", ""],
        "--profile": ["nothere.json", "folder", "notes.txt"],
        "--out": ["notes.txt", "/proc/compressm-job", "notes.txt/job"],
        "--data": ["nothere.npz"]})
    out += [
        Case("job", "--profile truncated", [*JOB, *BUDGET], setup=_truncate("profile.json")),
        Case("job", "--profile a JSON list", [*JOB, *BUDGET], setup=_json("profile.json", [1])),
        Case("job", "--profile without records", [*JOB, *BUDGET],
             setup=_edit_profile("profile.json", "p['records'] = []")),
        Case("job", "--dataset npz without --data", [*JOB, *BUDGET, "--dataset", "npz"]),
        Case("job", "--out a finished training run", [*JOB[:-1], "run0", *BUDGET],
             expect=(0, 2)),
        Case("job", "OUT/study.db is not a database", [*JOB, *BUDGET],
             setup=_text("job/study.db")),
        Case("job", "OUT/study.db truncated", [*JOB, *BUDGET], setup=_both(
            _python("import sqlite3; c = sqlite3.connect('job/study.db') if __import__('os')"
                    ".makedirs('job', exist_ok=True) is None else None; c.execute('create "
                    "table t (a)'); c.executemany('insert into t values (?)', [(i,) for i in "
                    "range(5000)]); c.commit()"), _truncate("job/study.db", 0.3))),
        Case("job", "interrupted (SIGTERM), then rerun", [*JOB[:2], "2", *JOB[3:], *BUDGET],
             expect=(130,), interrupt=("job/trials", signal.SIGTERM),
             rerun=[*JOB[:2], "2", *JOB[3:], *BUDGET], writes=("job",)),
    ]
    # --- run.py of a bundle
    run = ["RUNPY", "bundle"]
    x = np.random.default_rng(2).standard_normal((2, 12, 1)).astype(np.float32)
    for name, setup in {
        "missing": None, "folder": None, "text": _text("in.npy"),
        "2-D (batch, length) of 1 channel (documented: allowed)": _npy("in.npy", x[:, :, 0]),
        "4-D": _npy("in.npy", x[None]),
        "wrong channels": _npy("in.npy", np.repeat(x, 3, axis=2)),
        "NaN": _npy("in.npy", np.full_like(x, np.nan)), "inf": _npy("in.npy", np.full_like(
            x, np.inf)), "1e38": _npy("in.npy", np.full_like(x, 1e38)),
        "object dtype (pickle)": _npy("in.npy", np.array([object()] * 2, dtype=object)),
        "complex": _npy("in.npy", x.astype(np.complex64)),
        "empty batch": _npy("in.npy", x[:0]), "zero length": _npy("in.npy", x[:, :0]),
        "truncated .npy": _both(_npy("in.npy", x), _truncate("in.npy")),
    }.items():
        path = {"missing": "nothere.npy", "folder": "folder"}.get(name, "in.npy")
        out.append(Case("run.py", f"--input {name}", [*run, "--input", path], setup=setup,
                        expect=(0, 2) if name.endswith("allowed)") else (2,)))
    out += [
        Case("run.py", ".npz of one array not named x (documented: allowed)",
             [*run, "--input", "in.npz"], setup=_npz("in.npz", a=x), expect=(0, 2)),
        Case("run.py", ".npz of two arrays, neither x", [*run, "--input", "in.npz"],
             setup=_npz("in.npz", a=x, b=x)),
        Case("run.py", "--key missing", [*run, "--input", "in.npz", "--key", "zz"],
             setup=_npz("in.npz", x=x)),
    ]
    for name, path in {"a folder": "folder", "in a missing folder": "nothere/y.npy",
                       "not .npy": "y.txt", "unwritable (/proc)": "/proc/y.npy",
                       "an existing user file": "notes.txt"}.items():
        out.append(Case("run.py", f"--output {name}", [*run, "--input", "x.npy", "--output",
                                                         path]))
    out += _flag_cases("run.py", [*run, "--input", "x.npy"], {
        "--threads": ["0", "-1", "abc"], "--generate": ["5"], "--text": ["hello"]})
    out += _flag_cases("run.py", [*run, "--bench"], {
        "--seq-len": ["0", "-1"], "--min-time-s": ["-1", "nan", "0"], "--mode": ["bogus"]})
    out += [Case("run.py", "nothing to do", run)]
    for name, setup in {
        "manifest missing": lambda d: (d / "bundle" / "manifest.json").unlink(),
        "manifest not JSON": _text("bundle/manifest.json"),
        "manifest a JSON list": _json("bundle/manifest.json", []),
        "model.onnx missing": lambda d: (d / "bundle" / "model.onnx").unlink(),
        "model.onnx changed (hash)": _flip("bundle/model.onnx", 0.5),
        "model.onnx truncated": _truncate("bundle/model.onnx"),
    }.items():
        out.append(Case("run.py", f"bundle: {name}", ["RUNPY", "bundle", "--input", "x.npy"],
                        setup=setup))
    out += [Case("run.py", "bundle path is a file", ["RUNPY", "notes.txt", "--input", "x.npy"]),
            Case("run.py", "bundle path missing", ["RUNPY", "nothere", "--input", "x.npy"])]
    # --- the Python API
    api = {
        "load_dataset unknown name": "from compressm_tune.data import load_dataset\n"
                                     "load_dataset('bogus')",
        "load_dataset missing file": "from compressm_tune.data import load_dataset\n"
                                     "load_dataset('npz', path='nothere.npz')",
        "load_dataset val_fraction=2": "from compressm_tune.data import load_dataset\n"
                                       "load_dataset('npz', path='d.npz', val_fraction=2)",
        "SSMConfig d_model=0": "from compressm_tune.models import SSMConfig\n"
                               "SSMConfig(d_model=0)",
        "SSMConfig state_dims=[]": "from compressm_tune.models import SSMConfig\n"
                                   "SSMConfig(state_dims=[])",
        "SSMConfig arch bogus": "from compressm_tune.models import SSMConfig\n"
                                "SSMConfig(arch='bogus')",
        "SSMConfig dropout=2": "from compressm_tune.models import SSMConfig\n"
                               "SSMConfig(dropout=2.0)",
        "TrainConfig lr=nan": "from compressm_tune.training import TrainConfig\n"
                              "TrainConfig(lr=float('nan'))",
        "TrainConfig steps=0": "from compressm_tune.training import TrainConfig\n"
                               "TrainConfig(steps=0)",
        "TrainConfig device bogus": "from compressm_tune.training import TrainConfig\n"
                                    "TrainConfig(device='bogus')",
        "ReduceConfig window=2": "from compressm_tune.reduction import ReduceConfig\n"
                                 "ReduceConfig(window=2.0)",
        "load_checkpoint missing": "from compressm_tune.training import load_checkpoint\n"
                                   "load_checkpoint('nothere.pt')",
        "load_checkpoint a folder": "from compressm_tune.training import load_checkpoint\n"
                                    "load_checkpoint('folder')",
        "model_from_checkpoint text": "from compressm_tune.training import "
                                      "model_from_checkpoint\nmodel_from_checkpoint('notes.txt')",
        "model_from_checkpoint npz": "from compressm_tune.training import "
                                     "model_from_checkpoint\nmodel_from_checkpoint('d.npz')",
        "model_from_checkpoint cuda": "from compressm_tune.training import "
                                      "model_from_checkpoint\nmodel_from_checkpoint("
                                      "'model.pt', device='cuda')",
        "export_bundle missing checkpoint": "from compressm_tune.exporter import export_bundle\n"
                                            "export_bundle('nothere.pt', 'b')",
        "export_bundle out under a file": "from compressm_tune.exporter import export_bundle\n"
                                          "export_bundle('model.pt', 'notes.txt/b')",
        "export_bundle formats bogus": "from compressm_tune.exporter import export_bundle\n"
                                       "export_bundle('model.pt', 'b', formats=('bogus',))",
        "TuneConfig budget 2x": "from compressm_tune.search import TuneConfig\n"
                                "TuneConfig(budget='2x')",
        "TuneConfig trials=0": "from compressm_tune.search import TuneConfig\n"
                               "TuneConfig(budget_ms=1.0, trials=0)",
        "TuneConfig no budget": "from compressm_tune.search import TuneConfig\nTuneConfig()",
        "run_tune profile text": "from compressm_tune.search import TuneConfig, run_tune\n"
                                 "run_tune(TuneConfig(budget='0.5x', profile='notes.txt', "
                                 "out='job'))",
        "load_profile text": "from compressm_tune.hardware import load_profile\n"
                             "load_profile('notes.txt')",
        "load_profile missing": "from compressm_tune.hardware import load_profile\n"
                                "load_profile('nothere.json')",
        "from_hf_mamba missing": "from compressm_tune.models import from_hf_mamba\n"
                                 "from_hf_mamba('nothere')",
        "Trainer out_dir a file": "from compressm_tune.data import load_dataset\n"
                                  "from compressm_tune.models import SSMConfig\n"
                                  "from compressm_tune.training import TrainConfig, Trainer\n"
                                  "d = load_dataset('npz', path='d.npz')\n"
                                  "Trainer(SSMConfig(d_input=1, d_output=2, d_model=8, "
                                  "state_dims=[8]), TrainConfig(steps=2), d, 'notes.txt')",
        "Compressor tau=2": COMPRESSOR + "Compressor(m, o, reduce='tau=2', total_steps=10)",
        "Compressor window=nan": COMPRESSOR + "Compressor(m, o, total_steps=10, "
                                              "window=float('nan'))",
        "Compressor max_drop=nan": COMPRESSOR + "Compressor(m, o, total_steps=10, validate="
                                                "lambda: {'loss': 1.0}, max_drop=float('nan'))",
        "ReduceConfig max_drop=nan": "from compressm_tune.reduction import ReduceConfig\n"
                                     "ReduceConfig(max_drop=float('nan'))",
    }
    out += [Case("api", name, api=code) for name, code in api.items()]
    return out

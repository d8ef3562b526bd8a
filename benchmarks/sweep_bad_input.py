"""Bad input across every command, as one sweep: how does each case end?

Runs the bad inputs and injected faults of ``_bad_inputs.py`` through ``train``, ``export``,
``profile``, ``compare``, the budgeted job, a bundle's ``run.py`` and the Python API's main
entry points, each in a fresh folder holding copies of the user's files (a small dataset, a
trained run, a checkpoint, a bundle, profiles), and sorts every outcome:

- ``clean``: the documented exit status (2 unless the case says otherwise) with one error line
  (argparse's usage line plus its error line counts as one), no traceback, no new files;
- ``traceback``: a Python traceback or a crash (exit 1, an abort, a signal);
- ``silent accept``: exit 0 (or still running at the time limit) on input that must be refused;
- ``damaged``: a file the user had changed or removed (sha256 before and after);
- ``debris``: refused cleanly, but files or folders were left behind;
- ``unclear``: anything else (another exit status, several lines).

    python benchmarks/sweep_bad_input.py [--quick] [--only PREFIX] [--workers 2]

writes ``bench_results/bad_input_sweep.{md,json}`` (``--quick``: a temp dir, one case per
command). The sweep takes minutes; no test runs it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bad_inputs import TRAIN, Case, cases  # noqa: E402
from _common import machine, machine_line, parser, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the tree swept; --tree changes it
CLI = "import sys; from compressm_tune.cli import main; sys.exit(main())"
API = """\
import sys
from compressm_tune.errors import CompressmError
try:
{body}
except CompressmError as exc:
    print(f"api: error: {{exc}}", file=sys.stderr)
    sys.exit(2)
"""
CLASSES = ("clean", "traceback", "silent accept", "damaged", "debris", "unclear")


# ----------------------------------------------------------------------------- fixtures


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def make_fixtures(where: Path) -> None:
    """The user's files every case starts from."""
    rng = np.random.default_rng(0)
    np.savez(where / "d.npz", x=rng.standard_normal((1000, 12, 1)).astype(np.float32),
             y=rng.integers(0, 2, 1000))  # a validation split big enough for no note
    done = _run([*TRAIN[:-1], "run0"], where)
    assert done.returncode == 0, done.stderr
    shutil.copy(where / "run0" / "best.pt", where / "model.pt")
    done = _run(["export", "model.pt", "--out", "bundle", "--format", "onnx", "--chunk", "scan",
                 "-q"], where)
    assert done.returncode == 0, done.stderr
    shutil.copy(ROOT / "profiles" / "cpu-amd-epyc-2c.json", where / "profile.json")
    shutil.copy(ROOT / "profiles" / "cpu-amd-epyc-2c.json", where / "profile2.json")
    np.save(where / "x.npy", rng.standard_normal((2, 12, 1)).astype(np.float32))
    (where / "notes.txt").write_text("my notes\n")
    (where / "folder").mkdir()


# ----------------------------------------------------------------------------- running


def _files(d: Path) -> dict[str, str]:
    found = {}
    for p in d.rglob("*"):
        if p.name == ".lock":  # a run folder's lock: it records its holder's pid
            continue
        rel = p.relative_to(d).as_posix()
        found[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


def _command(case: Case, argv: list[str] | None = None) -> list[str]:
    argv = argv if argv is not None else case.argv
    if case.api is not None:
        body = textwrap.indent(case.api, "    ")
        return [sys.executable, "-c", API.format(body=body)]
    if argv[0] == "RUNPY":
        return [sys.executable, "bundle/run.py", *argv[1:]]
    return [sys.executable, "-c", CLI, *argv]


def _holder(d: Path, folder: str) -> subprocess.Popen:
    (d / folder).mkdir(exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", "import sys; from compressm_tune._io import "
                          f"FolderLock; lock = FolderLock({str(d / folder)!r}); "
                          "assert lock.acquire(); print('locked', flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def _ctrl_c() -> None:
    """Ctrl-C reaches the command even when the sweep runs in the background (where the
    shell ignores SIGINT for it, and its children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def _preimport() -> None:
    """Import the heavy packages once, before forking a process per case (seconds each)."""
    import onnxruntime  # noqa: F401
    import optuna  # noqa: F401

    import compressm_tune.cli  # noqa: F401
    import compressm_tune.exporter  # noqa: F401
    import compressm_tune.hardware  # noqa: F401
    import compressm_tune.search  # noqa: F401


def _in_process(case: Case, d: Path) -> tuple:
    """Run a CLI or API case in this process, as ``main(argv)`` or the API code would run in a
    fresh interpreter: (exit status, stdout, stderr)."""
    import contextlib
    import io
    import logging
    import traceback

    out, err = io.StringIO(), io.StringIO()
    logging.getLogger().handlers.clear()  # -q/-v configure logging again, onto ``err``
    here = os.getcwd()
    os.chdir(d)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if case.api is not None:
                    exec(API.format(body=textwrap.indent(case.api, "    ")), {})
                    code = 0
                else:
                    from compressm_tune.cli import main

                    code = main(case.argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # what a fresh interpreter would print and exit 1 with
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


def run_case(index: int, case: Case, fixtures: Path, scratch: Path) -> dict:
    d = scratch / f"case-{index:03d}"
    shutil.copytree(fixtures, d)
    if case.setup is not None:
        case.setup(d)
    before = _files(d)
    holder = _holder(d, case.lock) if case.lock else None
    if case.lock:
        before = _files(d)
    notes = []
    start = time.monotonic()
    separate = case.race or case.interrupt or (case.argv and case.argv[0] == "RUNPY")
    try:
        procs = [subprocess.Popen(_command(case), cwd=d, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c)
                 for _ in range(2 if case.race else 1 if separate else 0)]
        if case.interrupt:
            path, sig = case.interrupt
            if _wait_for(procs[0], d / path, case.timeout):
                procs[0].send_signal(sig)
            else:
                notes.append(f"{path} never appeared")
        results = [] if procs else [_in_process(case, d)]
        for p in procs:
            try:
                so, se = p.communicate(timeout=case.timeout)
                results.append((p.returncode, so, se))
            except subprocess.TimeoutExpired:
                p.kill()
                so, se = p.communicate()
                results.append(("timeout", so, se))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    seconds = time.monotonic() - start
    rc, stdout, stderr = results[0]
    outcome = classify(case, results, before, _files(d), notes)
    log = d / "run" / "metrics.jsonl"
    if case.race and log.is_file():  # the log the runs shared must still be JSON lines
        try:
            [json.loads(line) for line in log.read_text().splitlines()]
        except ValueError:
            outcome = "damaged"
            notes.append("run/metrics.jsonl is no longer JSON lines")
    if case.rerun is not None and outcome == "clean":
        again = subprocess.run(_command(case, case.rerun), cwd=d, env=_env(),
                               capture_output=True, text=True, timeout=600)
        if again.returncode != 0:
            outcome = "unclear"
            notes.append(f"the rerun exited {again.returncode}: "
                         f"{again.stderr.strip().splitlines()[-1:]}")
    shutil.rmtree(d, ignore_errors=True)
    row = {"group": case.group, "case": case.name, "argv": case.argv, "outcome": outcome,
           "exit": [r[0] for r in results], "stderr": stderr.strip()[-600:],
           "stdout_tail": stdout.strip()[-200:], "notes": notes, "seconds": round(seconds, 1)}
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one JSON line per case
    return row


def _clean_message(stderr: str, word: str = "error:") -> bool:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines or "Traceback" in stderr:
        return False
    if len(lines) == 1:
        return word in lines[0]
    # argparse: "usage: ..." (wrapped over several lines), then "prog ...: error: ..."
    return lines[0].startswith("usage:") and ": error: " in lines[-1] and \
        sum(": error: " in ln for ln in lines) == 1


def classify(case: Case, results: list, before: dict, after: dict, notes: list) -> str:
    changed = [p for p, h in before.items() if after.get(p) != h
               and not any(p == w or p.startswith(w + "/") for w in case.writes)]
    if changed:
        notes.append("changed or removed: " + ", ".join(changed[:5]))
        return "damaged"
    for rc, _, stderr in results:
        if "Traceback (most recent call last)" in stderr or rc in (1, 134, 139) or (
                isinstance(rc, int) and rc < 0):
            return "traceback"
    if case.race:
        codes = sorted(r[0] for r in results)
        ok = codes == [0, 0] or (codes == [0, 2] and _clean_message(
            next(r[2] for r in results if r[0] == 2)))
        return "clean" if ok else "unclear"
    rc, _, stderr = results[0]
    if rc == "timeout" or (rc == 0 and 0 not in case.expect):
        return "silent accept"
    if rc not in case.expect:
        notes.append(f"exit {rc}")
        return "unclear"
    if rc != 0 and not _clean_message(stderr, "interrupted" if rc == 130 else "error:"):
        return "unclear"
    new = [p for p in after if p not in before
           and not any(p == w or p.startswith(w + "/") for w in case.writes)]
    if rc not in (0,) and not case.interrupt and new:
        notes.append("left: " + ", ".join(sorted(new)[:5]))
        return "debris"
    return "clean"


def _child(index: int, fixtures: Path, scratch: Path, conn) -> None:
    conn.send(run_case(index, cases()[index], fixtures, scratch))
    conn.close()


def _row(case: Case, outcome: str, exit_status, note: str) -> dict:
    return {"group": case.group, "case": case.name, "argv": case.argv, "outcome": outcome,
            "exit": [exit_status], "stderr": "", "stdout_tail": "", "notes": [note],
            "seconds": None}


def run_all(todo: list[tuple[int, Case]], fixtures: Path, scratch: Path,
            workers: int) -> list[dict]:
    """Each case in a process forked from this one (which imported the heavy packages once):
    no state leaks between cases, and a case that aborts or hangs ends only itself."""
    _preimport()
    fork = multiprocessing.get_context("fork")
    pending, running, rows = list(todo), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            index, case = pending.pop(0)
            ours, theirs = fork.Pipe(duplex=False)
            proc = fork.Process(target=_child, args=(index, fixtures, scratch, theirs))
            proc.start()
            running[index] = (case, proc, ours, time.monotonic())
        for index, (case, proc, conn, started) in list(running.items()):
            if conn.poll():
                rows[index] = conn.recv()
            elif not proc.is_alive():
                rows[index] = _row(case, "traceback", proc.exitcode,
                                   f"the process died (exit {proc.exitcode})")
                print(json.dumps(rows[index]), file=sys.stderr, flush=True)
            elif time.monotonic() - started > case.timeout + 120:
                proc.kill()
                rows[index] = _row(case, "silent accept", "timeout",
                                   "still running at the time limit")
                print(json.dumps(rows[index]), file=sys.stderr, flush=True)
            else:
                continue
            proc.join()
            del running[index]
        time.sleep(0.05)
    return [rows[i] for i, _ in todo]


def main() -> None:
    global ROOT
    ap = parser(__doc__, "bad_input_sweep", quick="one case per command")
    ap.add_argument("--only", default=None, help="run the cases whose group/name starts so")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tree", type=Path, default=ROOT,
                    help="the compressm-tune checkout to sweep (another one: counts before a "
                         "fix); run with PYTHONPATH pointing at it too")
    args = ap.parse_args()
    ROOT = args.tree.resolve()
    todo = list(enumerate(cases()))
    if args.only:
        todo = [(i, c) for i, c in todo if f"{c.group}/{c.name}".startswith(args.only)]
    if args.quick:
        todo = list({c.group: (i, c) for i, c in reversed(todo)}.values())
    m = machine()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        fixtures = Path(tmp) / "fixtures"
        fixtures.mkdir()
        make_fixtures(fixtures)
        start = time.monotonic()
        rows = run_all(todo, fixtures, Path(tmp), args.workers)
        wall = time.monotonic() - start
    counts = Counter(r["outcome"] for r in rows)
    by_group: dict[str, Counter] = {}
    for r in rows:
        by_group.setdefault(r["group"], Counter())[r["outcome"]] += 1
    tree = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    lines = [f"# Bad input sweep: {len(rows)} cases, {wall:.0f} s", "", machine_line(m), "",
             f"Tree swept: {ROOT} at {tree or 'an unknown commit'} (uncommitted changes "
             "included).", "",
             "| command | cases | " + " | ".join(CLASSES) + " |",
             "|---|---|" + "---|" * len(CLASSES)]
    for group, c in by_group.items():
        lines.append(f"| {group} | {sum(c.values())} | "
                     + " | ".join(str(c.get(k, 0)) for k in CLASSES) + " |")
    lines.append("| **all** | " + str(len(rows)) + " | "
                 + " | ".join(str(counts.get(k, 0)) for k in CLASSES) + " |")
    lines += ["", "## Cases that are not clean", ""]
    for r in rows:
        if r["outcome"] != "clean":
            last = (r["stderr"].splitlines() or [""])[-1][:160].replace("|", "\\|")
            lines.append(f"- **{r['outcome']}** {r['group']}: `{r['case']}` exit {r['exit']}: "
                         f"{last} {'; '.join(r['notes'])}")
    write(args.results_dir / args.name, {"machine": m, "counts": dict(counts),
                                         "by_group": {g: dict(c) for g, c in by_group.items()},
                                         "wall_s": wall, "cases": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""`python -m ldm_lite.teaching [--quick] [--lessons DIR] [NN ...]` (what `make lessons` calls): run the lessons
one after the other as subprocesses, record each one's exit status and time, and write the index page."""
import argparse
import codecs
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ldm_lite.teaching.lesson import RESULTS_FILE, lesson_files, output_root, repo_root
from ldm_lite.teaching.page import RUN_RECORD, read_json, write_index

QUICK_BUDGET_S = 150  # every lesson in quick mode, one after the other, on 2 CPU cores


def run_lessons(files, quick: bool = False, python: str | None = None, out_root=None) -> list[dict]:
    """Run lesson scripts one after the other as subprocesses; [{"lesson", "returncode", "seconds", "reason"}].

    Each row is also written to <out_root>/NN/run.json for the index page; `reason` (when the lesson failed) is
    its first failed check, else the last line it wrote on stderr (shown live as it runs).
    """
    out_root = Path(out_root) if out_root is not None else output_root()
    rows = []
    for path in files:
        folder = out_root / Path(path).name[:2]
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (RESULTS_FILE, RUN_RECORD):
            (folder / stale).unlink(missing_ok=True)
        command = [python or sys.executable, str(path)] + (["--quick"] if quick else [])
        started = time.monotonic()
        returncode, last_line = _run_showing_stderr(command)
        row = {"lesson": Path(path).name, "returncode": returncode, "seconds": round(time.monotonic() - started, 1),
               "reason": "" if returncode == 0 else _failure_reason(folder, last_line, returncode)}
        (folder / RUN_RECORD).write_text(json.dumps(row, indent=2))
        rows.append(row)
    return rows


def _run_showing_stderr(command: list) -> tuple[int, str]:
    """Run `command` in the repository root, passing its stderr through; (exit code, last non-empty stderr line).
    The lesson imports this repository's ldm_lite (a script's own folder, docs/lessons/, comes first on sys.path,
    so without PYTHONPATH it would import whichever ldm_lite is installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH"))
                                                      if p)}
    process = subprocess.Popen(command, cwd=repo_root(), stderr=subprocess.PIPE, env=env)
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for chunk in iter(lambda: process.stderr.read1(65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-8192:]
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return process.wait(), lines[-1] if lines else ""


def _failure_reason(folder: Path, last_line: str, returncode: int) -> str:
    """One line on why a lesson failed: its failed checks, else its last stderr line, else its exit code."""
    results = read_json(folder / RESULTS_FILE)
    if results is not None:
        failed = [c["claim"] for c in results["checks"] if not c["passed"]]
        if failed:
            return f"{len(failed)} of {len(results['checks'])} checks failed, first: {failed[0]}"
        if not results["checks"]:
            return "the lesson made no checks"
    return last_line or f"exit code {returncode}"


def main(argv=None) -> int:
    """`python -m ldm_lite.teaching [--quick] [--lessons DIR] [NN ...]`: run the lessons, write the index page."""
    parser = argparse.ArgumentParser(prog="python -m ldm_lite.teaching", description=main.__doc__)
    parser.add_argument("numbers", nargs="*", help="lesson numbers to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="bounded runs (20 s each), the exact denoiser")
    parser.add_argument("--lessons", default=None, help="folder of NN_name.py lessons (default docs/lessons)")
    args = parser.parse_args(argv)
    files = lesson_files(args.lessons)
    if args.numbers:
        wanted = {int(n) for n in args.numbers}
        files = [p for p in files if int(p.name[:2]) in wanted]
    if not files:
        print("no lessons to run", file=sys.stderr)
        return 2
    results = run_lessons(files, args.quick, out_root=output_root())
    index = write_index(args.lessons, output_root())
    for row in results:
        status = "ok" if row["returncode"] == 0 else f"FAILED (exit {row['returncode']}): {row['reason']}"
        print(f"{row['lesson']:<32} {row['seconds']:>7.1f} s  {status}")
    total = sum(r["seconds"] for r in results)
    print(f"total {total:.1f} s; index: {index}")
    if args.quick and not args.numbers:
        verdict = "within" if total <= QUICK_BUDGET_S else "OVER"
        print(f"quick mode: {total:.0f} s for all lessons, {verdict} the budget of {QUICK_BUDGET_S} s on 2 CPU cores")
    return 0 if all(r["returncode"] == 0 for r in results) else 1

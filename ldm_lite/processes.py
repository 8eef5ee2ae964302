"""Train several runs at once, each in a child process of its own, with one progress bar over all of them.

Each child is `python -m train --config <written config.toml>` (`ldm_lite.cli.train`, run from this package's
folder): a fresh interpreter that imports only this ldm_lite, never the caller's `__main__`. That is what lets a
lesson script, a notebook cell or the study (possibly rank 0 under torchrun) train models in parallel: a
spawn-based process pool re-runs the caller's `__main__` in every worker, which breaks a script whose top-level
code starts the pool again.

The children inherit the environment except torchrun's variables (`distributed.TORCHRUN_VARIABLES`), so a
child of a torchrun rank trains on its own instead of joining the group; `hide_cuda` keeps them on the CPU.
Each run's folder gets `process.json` ({"seconds": wall time of its process, "returncode": 0}) when it ends.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ldm_lite import runs
from ldm_lite.config import Config
from ldm_lite.config_io import load_config, to_toml
from ldm_lite.distributed import TORCHRUN_VARIABLES
from ldm_lite.training_log import expected_steps

PROCESS_RECORD = "process.json"
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # the folder holding ldm_lite/, for the children's imports
# `python -m` would put the working directory first on sys.path, so a child started beside another checkout would
# import that one's ldm_lite; the child puts this package's folder first instead, then runs `python -m train`.
CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from ldm_lite.cli.train import entry_point; entry_point()")


class TrainingProcessFailed(ChildProcessError):
    """A child training process exited with a non-zero code; the message names the run and its last stderr line."""


def train_in_processes(configs: dict[str, Config], progress: bool, hide_cuda: bool = False, threads: int = 1,
                       processes: int | None = None, poll_s: float = 0.5) -> dict[str, Path]:
    """{name: Config} -> {name: run folder}: each run trained by its own child process, at most `processes` at
    a time (default: all at once), each with `threads` CPU threads (0 keeps each config's train.num_threads).

    One tqdm bar counts the steps logged in the runs' metrics.jsonl, toward the steps they are expected to end at
    (`progress`; False hides it and reads no log). A run that fails raises TrainingProcessFailed naming it and its
    last stderr line, after the other children are stopped (a stopped run resumes from its checkpoint next time).
    """
    if processes is not None and processes < 1:
        raise ValueError(f"processes must be >= 1 or None, got {processes}")
    configs = {name: _child_config(config, threads) for name, config in configs.items()}
    limit = processes or max(1, len(configs))
    done, total = progress_of(configs) if progress else (0, 0)
    with tempfile.TemporaryDirectory(prefix="ldm_lite_train_") as scratch, \
            tqdm(total=total, initial=done, desc="training " + " + ".join(configs), unit="step",
                 disable=not progress) as bar:
        waiting, running = list(configs), {}
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    name = waiting.pop(0)
                    running[name] = _start(name, configs[name], Path(scratch), hide_cuda)
                time.sleep(poll_s)
                if progress:
                    done, bar.total = progress_of(configs)
                    bar.update(max(0, done - bar.n))
                for name, child in list(running.items()):
                    if child["process"].poll() is not None:
                        _finish(name, running.pop(name), Path(configs[name].run.out))
        finally:
            for child in running.values():
                _stop(child["process"])
                child["stderr"].close()
        if progress:  # the runs end where they stopped
            bar.total = max(bar.n, progress_of(configs)[0])
            bar.update(bar.total - bar.n)
    return {name: Path(config.run.out) for name, config in configs.items()}


def _child_config(config: Config, threads: int) -> Config:
    """The config a child trains: its own thread count and no per-run progress bar of its own."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 keeps train.num_threads), got {threads}")
    train = dataclasses.replace(config.train, num_threads=threads) if threads else config.train
    return dataclasses.replace(config, train=train, run=dataclasses.replace(config.run, progress=False))


def child_environment(hide_cuda: bool, threads: int) -> dict:
    """The parent's environment without torchrun's variables."""
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _start(name: str, config: Config, scratch: Path, hide_cuda: bool) -> dict:
    """Write the config as TOML (checked to read back unchanged) and start the training child."""
    path = scratch / f"{name}.toml"
    path.write_text(to_toml(config))
    if load_config(path) != config:
        raise ValueError(f"run {name!r}: its config does not survive the TOML round trip; cannot train it in a "
                         "child process")
    stderr = (scratch / f"{name}.stderr").open("w")
    command = [sys.executable, "-c", CHILD_CODE, str(PACKAGE_PARENT), "--config", str(path)]
    # a session of its own: a terminal's Ctrl-C reaches the parent alone, whose clean-up sends each child one
    # SIGTERM (a child that got the SIGINT too would count that SIGTERM as a second signal and stop unsaved)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                               env=child_environment(hide_cuda, config.train.num_threads))
    return {"process": process, "stderr": stderr, "started": time.monotonic()}


def _finish(name: str, child: dict, run_dir: Path) -> None:
    """Record the run's process time, or raise naming the run and its last line on stderr."""
    child["stderr"].close()
    returncode = child["process"].returncode
    if returncode != 0:
        lines = [line for line in Path(child["stderr"].name).read_text().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "(nothing on stderr)"
        raise TrainingProcessFailed(f"training run {name!r} ({run_dir}) failed with exit code {returncode}: {last}")
    record = {"seconds": round(time.monotonic() - child["started"], 2), "returncode": returncode}
    runs.write_text(run_dir / PROCESS_RECORD, json.dumps(record))


def _stop(process: subprocess.Popen, grace_s: float = 120.0) -> None:
    """SIGTERM: the child finishes its step and saves a checkpoint (`run_safety.StopRequest`); killed after
    grace_s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_seconds(run_dir: Path) -> float | None:
    """The wall time of the process that last trained `run_dir` (`process.json`), or None."""
    try:
        return float(json.loads((Path(run_dir) / PROCESS_RECORD).read_text())["seconds"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def logged_step(run_dir: Path) -> int:
    """The last step written to a run's metrics log (0 before the first line)."""
    return _last_step(_records(run_dir))


def _last_step(records: list[dict]) -> int:
    return records[-1]["step"] if records else 0


def _records(run_dir: Path) -> list[dict]:
    try:
        return runs.read_metrics(Path(run_dir) / runs.METRICS_FILE)
    except (FileNotFoundError, ValueError):
        return []


def progress_of(configs: dict[str, Config]) -> tuple[int, int]:
    """(steps the runs have logged, steps they are expected to end at), each run's metrics.jsonl read once. A run
    ends at train.steps or, with a time budget, at the step where the budget runs out at its logged speed; a run
    that has not logged its training minutes yet is expected at the mean speed of those that have (at train.steps
    while none has)."""
    logged, timed = {}, {}
    for name, config in configs.items():
        records = _records(Path(config.run.out))
        logged[name] = _last_step(records)
        rows = [r for r in records if "event" not in r and r.get("train_minutes", 0) > 0 and r["step"] > 0]
        if rows:
            timed[name] = (rows[-1]["step"], 60 * rows[-1]["train_minutes"])
    speeds = [seconds / step for step, seconds in timed.values()]
    seconds_per_step = sum(speeds) / len(speeds) if speeds else None
    total = 0
    for name, config in configs.items():
        if name in timed:
            step, seconds = timed[name]
        elif seconds_per_step:  # no training minutes logged yet: at the mean speed of the runs that have
            step = max(logged[name], 1)
            seconds = step * seconds_per_step
        else:
            step, seconds = 0, 0.0
        total += expected_steps(step, config.train.steps, seconds, config.train.max_minutes)
    return sum(logged.values()), total

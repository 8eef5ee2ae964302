"""ldm_lite.processes: runs trained in child processes that never import the caller's __main__ (that a lesson-like
script run as __main__ trains through them is tested in test_teaching.py)."""
import json

import pytest

from ldm_lite import processes
from ldm_lite.config_io import config_from_dict
from ldm_lite.runs import METRICS_FILE


def _config(out, steps=2, **train):
    """A tiny unconditional run on 8 embedded 8x8 images: well under a second of training."""
    return config_from_dict({
        "data": {"source": "synthetic", "resolution": 8, "synthetic_size": 8},
        "model": {"preset": "tiny"},
        "train": {"steps": steps, "batch_size": 4, **train},
        "run": {"out": str(out), "log_every": 1, "checkpoint_every": 0, "progress": False},
    })


def test_runs_train_in_children_and_record_their_time(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: a child must not try to join a process group
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "ldm_lite").mkdir()  # another checkout in the working directory: the children must not import it
    (tmp_path / "ldm_lite" / "__init__.py").write_text("raise ImportError('the wrong ldm_lite')\n")
    monkeypatch.chdir(tmp_path)
    configs = {"a": _config(tmp_path / "a", steps=2), "b": _config(tmp_path / "b", steps=3, lr=5e-4)}
    run_dirs = processes.train_in_processes(configs, progress=False, hide_cuda=True)
    assert run_dirs == {"a": tmp_path / "a", "b": tmp_path / "b"}
    for name, steps in (("a", 2), ("b", 3)):
        log = [json.loads(line) for line in (run_dirs[name] / METRICS_FILE).read_text().splitlines()]
        assert [row["step"] for row in log] == list(range(1, steps + 1))
        assert all(row["train_minutes"] > 0 for row in log)   # what the progress bar projects a budget from
        assert processes.logged_step(run_dirs[name]) == steps
        assert processes.process_seconds(run_dirs[name]) > 0
    saved = (run_dirs["b"] / "config.toml").read_text()
    assert "num_threads = 1" in saved and "lr = 0.0005" in saved


def test_a_failed_child_names_its_run_and_last_stderr_line(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    configs = {"broken": _config(tmp_path / "taken")}
    with pytest.raises(processes.TrainingProcessFailed, match=r"'broken'.*exit code \d+: \S"):
        processes.train_in_processes(configs, progress=False)


def test_child_environment_drops_torchrun_and_can_hide_cuda(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = processes.child_environment(hide_cuda=True, threads=2)
    assert "MASTER_PORT" not in env and "LOCAL_RANK" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"


def _log(run_dir, *rows):
    run_dir.mkdir()
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_bar_expects_each_run_where_its_budget_or_steps_end(tmp_path):
    # a: 100 steps in 2 of its 10 budget minutes, then an evaluation row (it repeats the step and minutes): 500
    _log(tmp_path / "a", {"step": 50, "loss": 0.1, "train_minutes": 1.5},
         {"step": 100, "loss": 0.1, "train_minutes": 2.0},
         {"step": 100, "event": "eval", "kid": 0.1, "train_minutes": 2.0, "images_seen": 400, "clock": "wall"})
    budgeted = _config(tmp_path / "a", steps=10_000, max_minutes=10)
    fixed = _config(tmp_path / "b", steps=300)                          # no budget, nothing logged: its steps
    waiting = _config(tmp_path / "c", steps=10_000, max_minutes=5)      # not logging yet: a's 1.2 s per step
    assert processes.progress_of({"a": budgeted, "b": fixed}) == (100, 500 + 300)
    assert processes.progress_of({"a": budgeted, "b": fixed, "c": waiting}) == (100, 500 + 300 + 250)
    assert processes.progress_of({"c": waiting}) == (0, 10_000)         # no speed logged anywhere yet
    # an older log without training minutes (a run resumed across the upgrade) counts its steps, expected as c
    _log(tmp_path / "d", {"step": 40, "loss": 0.1})
    older = _config(tmp_path / "d", steps=10_000, max_minutes=5)
    assert processes.progress_of({"a": budgeted, "d": older}) == (140, 500 + 250)

"""Every lesson in docs/lessons/ runs in --quick mode with an empty model cache and passes all its checks.

The lessons run in this process (runpy, as `python docs/lessons/NN_name.py --quick` would), one thread, with the
output folder and the model cache in tmp_path, so a developer's runs/lessons/ cache never changes the result.
"""
import json
import runpy
import sys
import time

import pytest
import torch

from ldm_lite import teaching

LESSONS = teaching.lesson_files()
QUICK_BUDGET_S = 150  # all lessons together, on 2 CPU cores
_seconds = {}


def test_lessons_are_numbered_from_one():
    numbers = [int(path.name[:2]) for path in LESSONS]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers


@pytest.mark.parametrize("path", LESSONS, ids=[path.stem for path in LESSONS])
def test_lesson_runs_quick_and_its_checks_pass(path, tmp_path, monkeypatch):
    monkeypatch.setenv(teaching.OUT_ENV, str(tmp_path / "out"))
    monkeypatch.setenv(teaching.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(teaching.QUICK_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [str(path), "--quick"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{path.name} exited with {stop.code}"
    finally:
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt
        plt.close("all")
    _seconds[path.name] = time.monotonic() - started
    results = json.loads((tmp_path / "out" / path.name[:2] / teaching.RESULTS_FILE).read_text())
    failed = [f"{c['claim']} ({c['measured']})" for c in results["checks"] if not c["passed"]]
    assert results["mode"] == "quick" and results["checks"] and not failed, failed
    for figure in results["figures"]:
        assert (tmp_path / "out" / path.name[:2] / figure["file"]).stat().st_size > 0


def test_quick_lessons_fit_the_budget():
    """Runs last (pytest keeps the file order): the lessons that ran in this session, together."""
    if not _seconds:
        pytest.skip("no lesson ran in this session")
    total = sum(_seconds.values())
    assert total <= QUICK_BUDGET_S, {name: round(s, 1) for name, s in _seconds.items()}

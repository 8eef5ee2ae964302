"""Every lesson in docs/lessons/ runs in --quick mode with an empty model cache and passes all its checks.

The lessons run in this process (runpy, as `python docs/lessons/NN_name.py --quick` would), one thread, with the
output folder and the model cache in tmp_path, so a developer's runs/lessons/ cache never changes the result.
Each test stands alone (any order, any subset). The quick mode's time budget is measured and printed by the runner,
`python -m ldm_lite.teaching --quick`, not asserted here: a wall clock depends on the machine's load.
"""
import json
import runpy
import sys

import pytest
import torch

from ldm_lite import teaching

LESSONS = teaching.lesson_files()


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
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{path.name} exited with {stop.code}"
    finally:
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt
        plt.close("all")
    results = json.loads((tmp_path / "out" / path.name[:2] / teaching.RESULTS_FILE).read_text())
    failed = [f"{c['claim']} ({c['measured']})" for c in results["checks"] if not c["passed"]]
    assert results["mode"] == "quick" and results["checks"] and not failed, failed
    for figure in results["figures"]:
        assert (tmp_path / "out" / path.name[:2] / figure["file"]).stat().st_size > 0

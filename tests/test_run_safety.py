"""Run folders stay whole: one writer at a time (the folder lock), a second Ctrl-C stops at once, and a log torn
by a kill does not block the resume (Ctrl-C during training: test_training.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from ldm_lite import training_state
from ldm_lite.config_io import parse_overrides
from ldm_lite.generate import SampleSettings, generate
from ldm_lite.run_safety import LOCK_FILE, FolderLock, StopRequest
from ldm_lite.study import QualityStudyConfig, check_study_settings, run_study
from ldm_lite.training import train

from test_training import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_held_run_folder_refuses_a_second_training_sampling_and_study(tmp_path):
    run_dir = tmp_path / "run"
    with FolderLock(run_dir):
        with pytest.raises(ValueError, match=rf"'{run_dir}' is in use by pid {os.getpid()} on .*another --out"):
            train(tiny_config(run_dir))
        with pytest.raises(ValueError, match=rf"in use by pid {os.getpid()}"):
            generate(SampleSettings(checkpoint=str(tmp_path / "unused"), out=str(run_dir)))
        with pytest.raises(ValueError, match=rf"in use by pid {os.getpid()}"):
            run_study(QualityStudyConfig(data="synthetic", out=str(run_dir), device="cpu"))
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.jsonl").exists()


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    tmp_path.joinpath(LOCK_FILE).touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match="in use by another process"):  # it wrote no pid: named generically
            FolderLock(tmp_path).__enter__()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"


def test_a_second_signal_stops_at_once():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
    # the handlers in force before are back (Python's default_int_handler, or SIG_IGN in a background job)
    assert {number: signal.getsignal(number) for number in before} == before


def metrics_lines(steps) -> list:
    return [json.dumps({"step": step, "loss": 1.0 / step}) for step in steps]


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(metrics_lines([1, 2, 3])) + '\n{"step": 4, "lo')
    training_state._truncate_metrics(path, 2)
    assert path.read_text() == "\n".join(metrics_lines([1, 2])) + "\n"
    assert f"warning: '{path}': dropped its incomplete last line" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ['{"step": 2, "lo', "garbage", '{"loss": 0.5}', "[1, 2]"])
def test_a_damaged_log_line_before_the_last_is_refused_naming_file_and_line(tmp_path, damage):
    path = tmp_path / "metrics.jsonl"
    lines = metrics_lines([1, 2, 3])
    path.write_text("\n".join([lines[0], damage, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"'{path}' line 2 is damaged"):
        training_state._truncate_metrics(path, 3)


def test_a_study_that_fails_on_its_data_leaves_no_record_to_block_the_corrected_command(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        run_study(QualityStudyConfig(data=str(tmp_path / "nope"), out=str(tmp_path / "st1"), device="cpu"))
    assert not (tmp_path / "st1" / "study.json").exists()
    check_study_settings(QualityStudyConfig(data="synthetic", out=str(tmp_path / "st1")), tmp_path / "st1")


def test_resume_refuses_other_classes_and_changed_images_unless_allowed(tmp_path, capsys):
    from PIL import Image
    images, run_dir = tmp_path / "images", tmp_path / "run"

    def add_image(label: str, index: int):
        (images / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * index, 30 * index, 20 * index)).save(images / label / f"{index}.png")

    for index, label in enumerate(("cats", "dogs", "cats", "dogs")):
        add_image(label, index)
    options = dict(data__source=images, data__labels="dataset", train__batch_size=2, run__checkpoint_every=1)
    train(tiny_config(run_dir, train__steps=1, **options))
    add_image("birds", 5)
    with pytest.raises(ValueError, match=r"trained on the classes \['cats', 'dogs'\] but the data now hold "
                                         r"\['birds', 'cats', 'dogs'\]"):
        train(tiny_config(run_dir, train__steps=2, **options))
    shutil.rmtree(images / "birds")
    add_image("cats", 6)  # same classes, one image more
    with pytest.raises(ValueError, match="images differ from those .* pass --allow-data-change"):
        train(tiny_config(run_dir, train__steps=2, **options))
    assert parse_overrides(["--allow-data-change"])[1] == {"run.allow_data_change": "true"}
    capsys.readouterr()
    train(tiny_config(run_dir, train__steps=2, run__allow_data_change="true", **options))
    data = torch.load(run_dir / "checkpoint.pt", weights_only=True)["data"]
    assert [change["step"] for change in data["changes"]] == [1] and data["changes"][0]["to"] == data["fingerprint"]
    assert "resuming at step 1 on changed data" in capsys.readouterr().out

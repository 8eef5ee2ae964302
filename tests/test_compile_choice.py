"""train.compile (ldm_lite.compile_choice): the probe that chooses torch.compile on a run's first steps, driven
by a fake clock and a fake compiler (a real compile takes about a minute; bench/train_compile.py measures one):
the choice follows the measured speeds and the run's length, a chosen compiled model trains exactly what the
eager one trains, a compiler that fails leaves the run as an eager run, and older configs' booleans still read."""
import math

import pytest
import torch

from ldm_lite import compile_choice, runs, training
from ldm_lite.compile_choice import PROBE_STEPS, CompileProbe
from ldm_lite.config_io import load_config
from ldm_lite.distributed import World
from ldm_lite.training import train
from ldm_lite.training_budget import HORIZON_PROBE, fixed_horizon
from test_training import TINY, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class StepClock:
    """perf_counter for the probe, whose calls come in (start, end) pairs around a step: a step costs 1 s, or
    `compiled_cost` when the compiled model ran (it sets `cost`)."""

    def __init__(self, compiled_cost: float):
        self.now, self.calls, self.cost, self.compiled_cost = 0.0, 0, 1.0, compiled_cost

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.now, self.cost = self.now + self.cost, 1.0
        return self.now


class FakeCompiled(torch.nn.Module):
    """What the fake torch.compile returns: calls the model (so it trains the same) and counts its calls; its
    first two calls (compiling, warming up) take 60 s, so a probe that timed them would not choose it."""

    def __init__(self, model, clock: StepClock):
        super().__init__()
        self.wrapped, self.clock, self.calls = [model], clock, 0   # a list: not a submodule

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.clock.cost = 60.0 if self.calls <= 2 else self.clock.compiled_cost
        return self.wrapped[0](*args, **kwargs)


def fake_compiler(monkeypatch, compiled_cost: float) -> list:
    """Patch the probe's clock and torch.compile; returns the list the compiled models are appended to."""
    clock, made = StepClock(compiled_cost), []
    monkeypatch.setattr(compile_choice, "perf_counter", clock)
    monkeypatch.setattr(compile_choice.torch, "compile", lambda model: made.append(FakeCompiled(model, clock))
                        or made[-1])
    return made


def drive(probe: CompileProbe, eager, steps: int, steps_left: int = 10**6, seconds_left: float = math.inf) -> list:
    """`steps` steps from the probe's first one; which model each called ("eager" / "compiled")."""
    called = []
    for step in range(probe.first_step, probe.first_step + steps):
        model = probe.model_for(step, steps_left - (step - probe.first_step), seconds_left)
        if model is not eager:
            model(torch.zeros(1))
        called.append("eager" if model is eager else "compiled")
        probe.step_done()
    return called


@pytest.mark.parametrize("compiled_cost, choice", [(0.5, "on"), (0.95, "off")])
def test_auto_keeps_the_compiled_model_when_its_steps_measure_at_least_1_1x_faster(monkeypatch, compiled_cost,
                                                                                   choice):
    made = fake_compiler(monkeypatch, compiled_cost)
    eager = torch.nn.Identity()
    probe = CompileProbe(eager, "auto", World(), first_step=100)
    called = drive(probe, eager, 12)
    probe_end = 2 * PROBE_STEPS + 3   # 1 warm-up + 3 timed eager steps, 1 compiling + 1 warm + 3 timed compiled
    after = "compiled" if choice == "on" else "eager"
    assert called == ["eager"] * (PROBE_STEPS + 1) + ["compiled"] * (PROBE_STEPS + 2) + [after] * (12 - probe_end)
    assert probe.choice == choice and probe.settled_step == 100 + probe_end and len(made) == 1
    assert f"measured {1 / compiled_cost:.2f}x the eager speed" in probe.reason


@pytest.mark.parametrize("steps_left, seconds_left", [(500, math.inf), (10**6, 300.0)])
def test_auto_never_compiles_a_run_with_less_than_ten_minutes_left(monkeypatch, steps_left, seconds_left):
    """1 s per eager step: 500 steps or a 300 s budget are under 10 minutes."""
    made = fake_compiler(monkeypatch, 0.5)
    eager = torch.nn.Identity()
    probe = CompileProbe(eager, "auto", World(), first_step=0)
    assert drive(probe, eager, 12, steps_left, seconds_left) == ["eager"] * 12
    assert probe.choice == "off" and probe.settled_step == 0 and not made   # the speed never changed
    minutes = min(steps_left - PROBE_STEPS - 1, seconds_left) / 60   # measured at the step that would compile
    assert probe.reason == f"{minutes:.1f} min of training left, less than the 10 that repay compiling"


def test_on_compiles_from_the_first_step_and_off_never(monkeypatch):
    made = fake_compiler(monkeypatch, 2.0)   # slower: "on" is not measured
    eager = torch.nn.Identity()
    on, off = CompileProbe(eager, "on", World(), 0), CompileProbe(eager, "off", World(), 0)
    assert drive(on, eager, 12) == ["compiled"] * 12 and drive(off, eager, 12) == ["eager"] * 12
    assert (on.settled_step, off.settled_step, len(made)) == (0, 0, 1)


def trained(run_dir) -> dict:
    checkpoint = runs.load_checkpoint(run_dir / runs.CHECKPOINT_NAME)
    return {**{f"model.{k}": v for k, v in checkpoint["model"].items()},
            **{f"ema.{k}": v for k, v in checkpoint["ema"].items()}}


def test_a_chosen_compiled_model_trains_what_the_eager_run_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compile_choice, "MIN_MINUTES", 0.0)
    made = fake_compiler(monkeypatch, 0.5)
    auto = train(tiny_config(tmp_path / "auto", train__steps=12, train__compile="auto"))
    assert len(made) == 1 and made[0].calls == 12 - (PROBE_STEPS + 1)   # every step from the compiling one on
    assert "train.compile auto: on (a compiled step measured 2.00x the eager speed" in capsys.readouterr().out
    assert 'compile = "on"' in (auto / runs.RUN_CONFIG_FILE).read_text()
    eager = train(tiny_config(tmp_path / "off", train__steps=12, train__compile="off"))
    expected = trained(eager)
    assert all(torch.equal(value, expected[key]) for key, value in trained(auto).items())


class Broken(torch.nn.Module):
    """A compiled model whose first call fails, as torch.compile's does without a C++ compiler."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nthe rest of the message")


def refuse(model):
    """torch.compile where it refuses at once (some Python versions and platforms)."""
    raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nthe rest of the message")


@pytest.mark.parametrize("compiler", [lambda model: Broken(), refuse], ids=["at the first call", "at once"])
def test_a_compiler_that_fails_leaves_the_run_as_an_eager_run(tmp_path, monkeypatch, capsys, compiler):
    monkeypatch.setattr(compile_choice, "MIN_MINUTES", 0.0)
    monkeypatch.setattr(compile_choice.torch, "compile", compiler)
    auto = train(tiny_config(tmp_path / "auto", train__steps=10, train__compile="auto"))
    assert ("train.compile auto: off (compiling failed: RuntimeError: InvalidCxxCompiler: No working C++ compiler "
            "found)") in capsys.readouterr().out
    assert 'compile = "off"' in (auto / runs.RUN_CONFIG_FILE).read_text()
    eager = train(tiny_config(tmp_path / "off", train__steps=10, train__compile="off"))
    expected = trained(eager)
    assert all(torch.equal(value, expected[key]) for key, value in trained(auto).items())
    assert runs.load_checkpoint(auto / runs.CHECKPOINT_NAME)["step"] == 10


def test_a_budgeted_cosine_run_measures_its_horizon_once_the_compile_choice_settled(tmp_path, monkeypatch):
    """The probe settles at step 9 (4 eager steps, 5 compiled): the horizon's speed probe (HORIZON_PROBE, steps 5
    to 25 of a steady speed) runs from there, so it ends at step 9 + 25."""
    monkeypatch.setattr(compile_choice, "MIN_MINUTES", 0.0)
    fake_compiler(monkeypatch, 0.5)
    calls = []
    monkeypatch.setattr(training, "fixed_horizon", lambda config, step, *args: calls.append(step) or
                        fixed_horizon(config, step, *args))
    train(tiny_config(tmp_path / "run", train__steps=40, train__lr_schedule="cosine", train__max_minutes=30,
                      train__compile="auto"))
    assert calls == [2 * PROBE_STEPS + 3 + HORIZON_PROBE[1]]


def test_older_configs_booleans_still_read(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text(TINY.read_text().replace("[train]\n", "[train]\ncompile = false\n"))
    assert load_config(old).train.compile == "off"
    assert load_config(TINY, {"train.compile": "true"}).train.compile == "on"
    assert load_config(TINY, {"train.compile": "No"}).train.compile == "off"
    assert load_config(TINY, {"train.compile": "ON"}).train.compile == "on"
    assert load_config(TINY).train.compile == "auto"


def test_the_measured_step_calls_a_compiled_module_without_asking_its_truth():
    """torch.compile's module refuses len() (so bool()): the measured training step must call it as it is."""
    from ldm_lite import bf16_choice
    from ldm_lite.models import UNet, unet_preset

    class NoTruth(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.wrapped, self.calls = [model], 0

        def __len__(self):
            raise TypeError("UNet does not support len()")

        def forward(self, *args):
            self.calls += 1
            return self.wrapped[0](*args)

    model = UNet(unet_preset("tiny", in_channels=3, sample_size=8, num_classes=3))
    compiled = NoTruth(model)
    bf16_choice.training_step(model, (3, 8, 8), 2, torch.device("cpu"), forward=compiled)()
    assert compiled.calls == 1 and all(p.grad is not None for p in model.parameters())

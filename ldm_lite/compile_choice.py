"""train.compile: torch.compile of the model where it pays, chosen on the run's own first steps ("auto").

bench/train_compile.py measured the study's recipe on one Zen 4 core: compiled, a bf16 training step ran 1.24x
faster after about 47 s of compiling, a float32 one 0.94x. Whether it pays depends on the precision, the model, the
machine and the length of the run, so "auto" measures it, and every measured step is a real training step:

1. steps 1..PROBE_STEPS after the run's (or resume's) first step run eager and are timed;
2. a run that will train less than MIN_MINUTES more (its budget, or its steps at that speed) stays eager:
   compiling costs about a minute;
3. otherwise the next step compiles the model, one more warms it, PROBE_STEPS compiled steps are timed, and the
   compiled model is kept when its median step is at least MIN_GAIN times faster than the eager median;
4. where compiling fails (no C++ compiler, an operation the compiler does not take), the step is run again eager
   and so is the rest of the run, with the reason in one line. The failed step changed nothing: a step reseeds
   from (seed, step), and the optimiser and EMA update only after the backward pass.

Under torchrun every process takes the same choice (the slowest eager step and the smallest gain decide; a compiler
that fails fails in every process, at the same step). "on" compiles from the first step, "off" never does.
"""
import statistics
from time import perf_counter

import torch

from ldm_lite import bf16_choice
from ldm_lite.bf16_choice import MIN_GAIN
from ldm_lite.distributed import World, agree_max

MIN_MINUTES = 10.0   # a run with less training left than this stays eager under "auto"
PROBE_STEPS = 3      # timed steps, eager and compiled


class CompileProbe:
    """The model each training step calls, and (train.compile = "auto") the measurement that chooses it.

    `choice` is "on" or "off" once settled (None while measuring); `settled_step` the step from which the speed
    no longer changes (the first step unless the probe compiled), so a speed measured later is the run's speed."""

    def __init__(self, model: torch.nn.Module, mode: str, world: World, first_step: int):
        self.eager, self.world, self.first_step = model, world, first_step
        self.compiled = torch.compile(model) if mode == "on" else None
        self.choice = None if mode == "auto" else mode
        self.settled_step = None if mode == "auto" else first_step
        self.reason = ""
        self.times = {"eager": [], "compiled": []}
        self._timing, self._started = None, 0.0

    @property
    def compiling(self) -> bool:
        """Whether the current step calls a compiled model whose choice is not settled (a failure falls back)."""
        return self.choice is None and self.compiled is not None

    def model_for(self, step: int, steps_left: int, seconds_left: float) -> torch.nn.Module:
        """The model step `step` calls; `steps_left` / `seconds_left` (budget, inf without one) bound the run."""
        if self.choice is not None:
            return self.compiled if self.choice == "on" else self.eager
        k = step - self.first_step
        if k == PROBE_STEPS + 1:
            per_step = statistics.median(self.times["eager"])
            # one value for every process: each one's budget clock started on its own
            minutes = agree_max(min(steps_left * per_step, seconds_left) / 60, self.world)
            if minutes < MIN_MINUTES:
                self._settle("off", self.first_step, f"{minutes:.1f} min of training left, less than the "
                             f"{MIN_MINUTES:g} that repay compiling")
                return self.eager
            try:
                self.compiled = torch.compile(self.eager)
            except Exception as error:  # some Python versions and platforms refuse at once
                self.failed(step, error)
                return self.eager
        elif k == 2 * PROBE_STEPS + 3:
            eager, compiled = (statistics.median(self.times[kind]) for kind in ("eager", "compiled"))
            gain = -agree_max(-eager / compiled, self.world)
            self._settle("on" if gain >= MIN_GAIN else "off", step, f"a compiled step measured {gain:.2f}x the "
                         f"eager speed, {compiled:.3f} against {eager:.3f} s; kept from {MIN_GAIN:g}x")
            return self.model_for(step, steps_left, seconds_left)
        compiled = k > PROBE_STEPS
        if 1 <= k <= PROBE_STEPS or k >= PROBE_STEPS + 3:  # not the first step, nor the two that compile
            if self.world.device.type == "cuda":
                torch.cuda.synchronize(self.world.device)  # the previous step's queued work is not this one's
            self._timing, self._started = "compiled" if compiled else "eager", perf_counter()
        return self.compiled if compiled else self.eager

    def step_done(self) -> None:
        """Call after each training step: records its time when it was a measured one."""
        if self._timing is not None:
            if self.world.device.type == "cuda":
                torch.cuda.synchronize(self.world.device)
            self.times[self._timing].append(perf_counter() - self._started)
            self._timing = None

    def failed(self, step: int, error: Exception) -> None:
        """Compiling raised at `step`: the run goes on eager from that step."""
        self._settle("off", step, failure_reason(error))
        self._timing = None

    def _settle(self, choice: str, step: int, reason: str) -> None:
        self.choice, self.settled_step, self.reason = choice, step, reason
        if choice == "off":
            self.compiled = None  # frees the compiled graphs


def failure_reason(error: Exception) -> str:
    """One line saying why torch.compile failed: the exception's type and the first line of its message."""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"compiling failed: {type(error).__name__}: {message[:200]}"


def training_gain(model, shape, batch: int, device: torch.device, dtype, calls: int = 3) -> float:
    """eager / compiled seconds of one training step's forward and backward (`bf16_choice.training_step`) of
    `model` under autocast `dtype` (None: float32) on this process's threads, after two compiled steps that compile
    and warm up; for a choice made once for several runs (the study's models). The random state is left as it
    was and the gradients are cleared. Raises what torch.compile raises."""
    eager = bf16_choice.training_step(model, shape, batch, device)
    compiled = bf16_choice.training_step(model, shape, batch, device, forward=torch.compile(model))
    with bf16_choice.forked_rng(device):  # dropout draws
        bf16_choice.median_seconds(compiled, device, dtype, 1)  # compiles forward and backward, then warms up
        gain = (bf16_choice.median_seconds(eager, device, dtype, calls)
                / bf16_choice.median_seconds(compiled, device, dtype, calls))
    for p in model.parameters():
        p.grad = None
    return gain

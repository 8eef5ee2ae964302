"""Whether bf16 autocast pays on this machine, decided by measuring it, never assumed.

On a CPU with AVX-512 bf16 (Zen 4) bf16 autocast samples about 2x and trains about 1.2x faster than float32; on
one with only AVX2 (Zen 3) bf16 matmuls run about 50x slower. So "auto" settings (run.eval_autocast, the study's
--autocast, train.precision) time the model both ways on the threads and device the work will use and keep bf16
only when it is at least MIN_GAIN times faster.
"""
import time

import torch

MIN_GAIN = 1.1   # bf16 is kept when it runs at least this much faster than float32


def median_seconds(call, device: torch.device, dtype, calls: int) -> float:
    """Median seconds of `calls` runs of call() under autocast `dtype` (None: float32), after one warm-up run
    (the first sets up kernels and memory)."""
    times = []
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(calls + 1):
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    return sorted(times[1:])[calls // 2]


def forked_rng(device: torch.device):
    """A block whose random draws (CPU, and `device`'s when CUDA) leave the random state as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _inputs(model, shape, batch: int, device: torch.device):
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 500, device=device)
    labels = torch.full((batch,), model.config.num_classes, device=device) if model.config.num_classes else None
    return x, t, labels


@torch.no_grad()
def sampling_gain(model, shape, device: torch.device, batch: int = 100, calls: int = 5) -> float:
    """float32 / bf16 seconds of one model call on a batch of `shape` (C, H, W), on this process's threads."""
    with torch.random.fork_rng(devices=[]):
        x, t, labels = _inputs(model, shape, batch, device)
    call = lambda: model(x, t, labels)  # noqa: E731
    return median_seconds(call, device, None, calls) / median_seconds(call, device, torch.bfloat16, calls)


def training_step(model, shape, batch: int, device: torch.device, forward=None):
    """A call running one training step's forward and backward (a mean-squared loss on a fixed random batch of
    `shape`) through `forward` (default: `model`, e.g. its torch.compile), its inputs drawn without moving the
    random state; it accumulates gradients (clear them)."""
    with forked_rng(device):
        x, t, labels = _inputs(model, shape, batch, device)
        target = torch.randn_like(x)

    def step():
        loss = torch.nn.functional.mse_loss((model if forward is None else forward)(x, t, labels).float(), target)
        loss.backward()
    return step


def training_gain(model, shape, batch: int, device: torch.device, calls: int = 3) -> float:
    """float32 / bf16 seconds of one training step's forward and backward (`training_step`) on this process's
    threads. The random state is left as it was and the gradients are cleared (a new model has none), so a run
    that measures trains exactly like one told its precision."""
    step = training_step(model, shape, batch, device)
    with forked_rng(device):  # dropout draws
        gain = median_seconds(step, device, None, calls) / median_seconds(step, device, torch.bfloat16, calls)
    for p in model.parameters():
        p.grad = None
    return gain


def choose(gain: float) -> str:
    """"bf16" when the measured `gain` reaches MIN_GAIN, else "fp32"."""
    return "bf16" if gain >= MIN_GAIN else "fp32"

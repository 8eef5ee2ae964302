"""ldm_lite.sampling: signal-leak initial noise at the first sampled timestep, epsilon scaling against hand-computed
steps and against a transcription of ADM-ES's schedule, bit-for-bit equality with the plain sampler when lambda = 1,
per-sample randomness (the images do not depend on the batch size), run options checked before the loop, and
classifier-free guidance as a model wrapper."""
import math
import warnings

import pytest
import torch

from ldm_lite.guidance import ClassifierFreeGuidance
from ldm_lite.leak import LeakStats
from ldm_lite.sampling import eps_scale_schedule, initial_noise, sample, sample_generators
from ldm_lite.schedulers import ALIASES, DDIMScheduler, DDPMScheduler, from_config, randn_tensor

SHAPE = (3, 8, 8)
SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULER_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class TinyDenoiser(torch.nn.Module):
    """A fixed, timestep-dependent stand-in for a UNet: (B, 3, H, W), timesteps (B,) -> (B, 3, H, W)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, timesteps, class_labels=None):
        scale = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * 0.5 + scale * x


# ----------------------------------------------------------------------------- initial noise


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_initial_noise_uses_the_first_sampled_timestep(name, spacing, offset):
    diffusers = pytest.importorskip("diffusers")
    config = dict(SCALED_LINEAR, timestep_spacing=spacing, steps_offset=offset)
    scheduler = SCHEDULER_CLASSES[name](**config)
    scheduler.set_timesteps(7)
    reference = getattr(diffusers, f"{name.upper()}Scheduler")(**config)
    reference.set_timesteps(7)
    t0 = int(scheduler.timesteps[0])
    assert t0 == int(reference.timesteps[0]) == {"leading": 853, "trailing": 999, "linspace": 999}[spacing]

    leak = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = initial_noise(scheduler, (4, *SHAPE), leak=leak, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    alpha_bar = scheduler.alphas_cumprod.double()
    expected = alpha_bar[t0].sqrt() * leak.double() + (1 - alpha_bar[t0]).sqrt() * noise.double()
    torch.testing.assert_close(x_T.double(), expected, rtol=0, atol=1e-6)  # float32 rounding only
    # the test can tell neighbouring timesteps apart: 10 steps away the leak term moves by > 1e-3
    other = alpha_bar[t0 - 10].sqrt() * leak.double() + (1 - alpha_bar[t0 - 10]).sqrt() * noise.double()
    assert (other - expected).abs().max() > 1e-3


def test_initial_noise_without_leak_is_plain_randn():
    scheduler = DDIMScheduler(**SCALED_LINEAR)
    scheduler.set_timesteps(10)
    x_T = initial_noise(scheduler, (2, *SHAPE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_T, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)))


def test_initial_noise_draws_the_leak_from_statistics_after_the_noise():
    data = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    stats = LeakStats.fit(data, kind="dct+pixel", n_components=3).with_channel_mean(1, 0.7)
    scheduler = DDPMScheduler(**SCALED_LINEAR, timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    x_T = initial_noise(scheduler, (5, *SHAPE), leak=stats, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(5, *SHAPE, generator=generator)
    leak = stats.sample(5, generator=generator)
    ab = float(scheduler.alphas_cumprod[999])
    torch.testing.assert_close(x_T, math.sqrt(ab) * leak + math.sqrt(1 - ab) * noise, rtol=0, atol=1e-6)
    # the channel mean set on the statistics comes through, scaled by sqrt(alpha_bar[t0]) (noise mean ~ 0.02)
    shift = (x_T[:, 1] - math.sqrt(1 - ab) * noise[:, 1]).mean(dim=(-2, -1))
    torch.testing.assert_close(shift, torch.full((5,), 0.7 * math.sqrt(ab)), rtol=0, atol=1e-6)


def test_initial_noise_rejects_statistics_of_another_shape():
    stats = LeakStats.fit(torch.rand(8, 3, 4, 4) * 2 - 1, kind="pixel")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(3, 8, 8\)"):
        initial_noise(scheduler, (2, *SHAPE), leak=stats)


@pytest.mark.parametrize("alias", list(ALIASES))
def test_zero_terminal_snr_warns_that_a_leak_has_no_effect(alias):
    """Every sampler, the sigma ones included (their alpha_bar[T - 1] = 0 is clamped to 2^-24, sigma_max 4096)."""
    zero_snr = {"_class_name": "DDIMScheduler", **SCALED_LINEAR, "rescale_betas_zero_snr": True,
                "prediction_type": "v_prediction"}
    scheduler = from_config(zero_snr, alias, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    leak = torch.ones(2, *SHAPE)
    with pytest.warns(UserWarning, match="no effect"):
        x_T = initial_noise(scheduler, (2, *SHAPE), leak=leak, generator=torch.Generator().manual_seed(0))
    if alias == "ddim":
        assert torch.equal(x_T, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)))
    # leading spacing starts at 900 < 999, where alpha_bar > 0: no warning
    leading = from_config(zero_snr, alias, timestep_spacing="leading")
    leading.set_timesteps(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        initial_noise(leading, (2, *SHAPE), leak=leak)


# ----------------------------------------------------------------------------- epsilon scaling


def plain_sampler(model, scheduler, n, seed, eta=None):
    """The textbook loop: x_T = randn, then scheduler.step with the raw model output at every timestep; sample i
    draws from its own generator (diffusers' list-of-generators convention)."""
    generator = sample_generators(seed, 0, n)
    x = torch.cat([torch.randn(1, *SHAPE, generator=g) for g in generator])
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(x, torch.full((n,), int(t)))
            kwargs = {} if eta is None else {"eta": eta}
            x = scheduler.step(output, t, x, generator=generator, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name, eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0)])
def test_eps_scale_one_reproduces_the_plain_sampler_bit_for_bit(name, eta):
    model = TinyDenoiser()
    scheduler = SCHEDULER_CLASSES[name](**SCALED_LINEAR)
    scheduler.set_timesteps(10)
    expected = plain_sampler(model, scheduler, 4, seed=0, eta=eta)
    options = {} if eta is None else {"eta": eta}
    for eps_scale in (None, 1.0, [1.0] * 10):
        ours = sample(model, scheduler, 4, shape=SHAPE, eps_scale=eps_scale, progress=False, seed=0,
                      step_options=options)
        assert torch.equal(ours, expected), eps_scale


def hand_step(name, scheduler, x, output, t, prev_t, lam, noise):
    """One DDPM / DDIM (eta = 0) step with epsilon scaling, in float64 from the formulas (REFERENCES.md):
    x0 = (x_t - sqrt(1 - ab) eps / lam) / sqrt(ab), clipped to [-1, 1]; DDIM: sqrt(ab') x0 + sqrt(1 - ab') eps / lam;
    DDPM: the posterior mean (Ho et al. eq. 7) of the respaced chain plus sqrt(beta_tilde) z."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    x, output = x.double(), output.double()
    ab = alphas_cumprod[t]
    ab_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    eps = output / lam
    x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    if name == "ddim":
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    beta = 1 - ab / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
    variance = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
    return mean + variance.sqrt() * noise.double() if t > 0 else mean


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("eps_scale,slope", [(1.017, 0.0), (1.03, -0.002)], ids=["constant", "k*t+b"])
def test_eps_scaling_matches_hand_computed_steps(name, eps_scale, slope):
    model, steps, n, seed = TinyDenoiser(), 10, 4, 0
    scheduler = SCHEDULER_CLASSES[name](**SCALED_LINEAR)
    scheduler.set_timesteps(steps)
    records = []
    sample(model, scheduler, n, shape=SHAPE, eps_scale=eps_scale_schedule(eps_scale, steps, slope), progress=False,
           seed=seed, callback=records.append)
    lambdas = [slope * (steps - 1 - i) + eps_scale for i in range(steps)]  # t = N-1 is the first step
    generator = sample_generators(seed, 0, n)  # replay the draws: x_T, then one noise per DDPM step t > 0
    randn_tensor((n, *SHAPE), generator)
    timesteps = scheduler.timesteps.tolist() + [-1]
    assert [r["step_index"] for r in records] == list(range(steps))
    for i, record in enumerate(records):
        t, prev_t = timesteps[i], timesteps[i + 1]
        noise = randn_tensor((n, *SHAPE), generator) if name == "ddpm" and t > 0 else None
        expected = hand_step(name, scheduler, record["x_t"], record["model_output"], t, prev_t, lambdas[i], noise)
        # float32 vs float64 (measured max 4.5e-7; the x0 estimate amplifies rounding by 1 / sqrt(ab) <= 15 here)
        torch.testing.assert_close(record["prev_sample"].double(), expected, rtol=0, atol=2e-6)
        unscaled = hand_step(name, scheduler, record["x_t"], record["model_output"], t, prev_t, 1.0, noise)
        assert (unscaled - expected).abs().max() > 5e-5, f"step {i}: lambda {lambdas[i]} had no visible effect"


def adm_es_lambdas(k: float, b: float, num_steps: int, centred: bool = False) -> list:
    """A transcription of ADM-ES (Ning et al. 2023, their gaussian_diffusion.py): lambda_t = k * t + b over the
    respaced index t = 0 .. N-1, centred form b = b - k * (N - 1) / 2; their loop runs t = N-1 (noisiest) down
    to 0, so this is the list in sampling order."""
    if centred:
        b = b - k * (num_steps - 1) / 2
    by_index = {t: k * t + b for t in range(num_steps)}
    return [by_index[t] for t in reversed(range(num_steps))]


@pytest.mark.parametrize("k, b, steps", [(0.0, 1.017, 20), (0.0004, 1.0, 20), (-0.001, 1.03, 7), (0.002, 1.005, 1)])
@pytest.mark.parametrize("centred", [False, True])
def test_eps_scale_schedule_follows_the_papers_convention(k, b, steps, centred):
    expected = adm_es_lambdas(k, b, steps, centred)
    assert eps_scale_schedule(b, steps, k, centred) == pytest.approx(expected, abs=1e-12)
    if k > 0 and steps > 1:  # a positive slope scales the noisiest (first) step most
        assert expected[0] > expected[-1]
    if centred:
        assert sum(expected) / steps == pytest.approx(b, abs=1e-12)


def test_eps_scale_schedule_rejects_non_positive_and_mismatched_lists():
    assert eps_scale_schedule(None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="must stay > 0"):
        eps_scale_schedule(1.0, 10, -0.2)  # lambda_t = 1 - 0.2 t is negative at the first (t = 9) step
    with pytest.raises(ValueError, match="3 values"):
        eps_scale_schedule([1.0, 1.0], 3)


# ----------------------------------------------------------------------------- autocast


def test_autocast_covers_the_model_only_and_spans_the_loop():
    """bf16 autocast: the model runs under it (its bf16 output is cast back), the scheduler step and callback
    in float32 with autocast off, inside the one outer context that keeps the bf16 weight copies alive; the
    result equals entering autocast around each model call."""
    model = TinyDenoiser()
    seen = []

    def autocast_nesting() -> int:
        """How many autocast contexts are open (autocast drops its weight copies when this reaches 0)."""
        level = torch.autocast_increment_nesting() - 1
        torch.autocast_decrement_nesting()
        return level

    class Recording(torch.nn.Module):
        def forward(self, x, timesteps, class_labels=None):
            seen.append(("model", torch.is_autocast_enabled("cpu"), autocast_nesting()))
            return model.conv(x)  # bf16 under autocast

    def callback(info):
        seen.append(("step", torch.is_autocast_enabled("cpu"), autocast_nesting(), info["model_output"].dtype,
                     info["prev_sample"].dtype))

    scheduler = DDIMScheduler(**SCALED_LINEAR)
    out = sample(Recording(), scheduler, 2, shape=SHAPE, num_inference_steps=3, seed=0, progress=False,
                 callback=callback,
                 autocast_dtype=torch.bfloat16)
    # the step is 2 deep: the loop's autocast and the autocast-off block inside it
    assert seen == [("model", True, 1), ("step", False, 2, torch.float32, torch.float32)] * 3
    assert autocast_nesting() == 0

    def per_call(x, timesteps, class_labels=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.conv(x)

    expected = sample(per_call, scheduler, 2, shape=SHAPE, num_inference_steps=3, seed=0, progress=False)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    float32 = sample(lambda x, t, y=None: model.conv(x), scheduler, 2, shape=SHAPE, num_inference_steps=3, seed=0,
                     progress=False)
    assert not torch.equal(out, float32) and (out - float32).abs().max() < 0.1  # bf16 was used, and is close


# ----------------------------------------------------------------------------- per-sample randomness


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_images_do_not_depend_on_the_batch_size_or_the_first_index(name, options):
    """Sample i draws from its own generator: one batch of 6, batches of 4 + 2, and a run continued at index 4
    draw the same noise; CPU kernels may round differently by batch size, so images agree within 1e-5."""
    model, scheduler = TinyDenoiser(), SCHEDULER_CLASSES[name](**SCALED_LINEAR)
    draws = []

    def run(n, batch_size, first_index=0):
        records = []
        images = sample(model, scheduler, n, shape=SHAPE, num_inference_steps=5, seed=3, batch_size=batch_size,
                        first_index=first_index, step_options=options, progress=False, callback=records.append)
        draws.append(torch.cat([r["x_t"] for r in records if r["step_index"] == 0]))
        return images

    whole = run(6, 6)
    split = run(6, 4)
    continued = torch.cat([run(4, 4), run(2, 2, first_index=4)])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.cat(draws[2:]))  # x_T exactly
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(continued, whole, rtol=0, atol=1e-5)
    other = sample(model, scheduler, 6, shape=SHAPE, num_inference_steps=5, seed=4, step_options=options,
                   progress=False)
    assert (other - whole).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # another seed: every image differs


def test_run_options_are_checked_before_the_first_model_call():
    calls = []

    def model(x, t, y=None):
        calls.append(1)
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="DDPMScheduler takes no eta"):
        sample(model, DDPMScheduler(), 2, shape=SHAPE, num_inference_steps=3, step_options={"eta": 0.5})
    with pytest.raises(ValueError, match="takes no use_clipped_model_output"):
        sample(model, DDPMScheduler(), 2, shape=SHAPE, num_inference_steps=3,
               step_options={"use_clipped_model_output": True})

    class NoScaling(DDIMScheduler):  # a scheduler whose step has no eps_scale (as the sigma-based ones)
        def step(self, model_output, timestep, sample, generator=None):
            return super().step(model_output, timestep, sample, generator=generator)

    with pytest.raises(ValueError, match="epsilon scaling is not available with NoScaling"):
        sample(model, NoScaling(), 2, shape=SHAPE, num_inference_steps=3, eps_scale=1.01)
    assert not calls
    sample(model, NoScaling(), 2, shape=SHAPE, num_inference_steps=3, eps_scale=1.0, progress=False)  # 1 is off
    assert len(calls) == 3


def test_classifier_free_guidance_wrapper_is_the_guided_combination():
    """eps = eps_null + w (eps_cond - eps_null) (Ho & Salimans 2022, eq. 6), with the null label num_classes."""

    class Conditional(torch.nn.Module):
        config = type("Config", (), {"num_classes": 3, "in_channels": 3, "sample_size": 8})()

        def forward(self, x, timesteps, class_labels):
            return x * (1 + class_labels.view(-1, 1, 1, 1).float()) + timesteps.view(-1, 1, 1, 1) / 1000

    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([500, 500]), torch.tensor([0, 2])
    guided = ClassifierFreeGuidance(Conditional(), 3.0)(x, t, labels)
    cond = x * (1 + labels.view(-1, 1, 1, 1)) + 0.5
    null = x * 4 + 0.5
    torch.testing.assert_close(guided, null + 3.0 * (cond - null))
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(TinyDenoiser(), 2.0)


class LearnedSigma(torch.nn.Module):
    """A class-conditional stand-in with learned variance: (B, 3, H, W) -> (B, 6, H, W), label-dependent halves."""
    config = type("Config", (), {"num_classes": 3, "in_channels": 3, "sample_size": 8})()

    def forward(self, x, timesteps, class_labels):
        label = class_labels.view(-1, 1, 1, 1).float()
        return torch.cat([x * (1 + label), torch.tanh(x) * (0.2 + label) - timesteps.view(-1, 1, 1, 1) / 1000], 1)


def test_guidance_leaves_the_learned_variance_channels_conditional():
    """GLIDE and DiT guide the first C channels only; the variance half is the conditional output's, bit for bit."""
    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([500, 500]), torch.tensor([0, 2])
    model = LearnedSigma()
    guided = ClassifierFreeGuidance(model, 3.0)(x, t, labels)
    conditional, null = model(x, t, labels), model(x, t, torch.full_like(labels, 3))
    assert guided.shape == (2, 6, 8, 8)
    assert torch.equal(guided[:, 3:], conditional[:, 3:])
    torch.testing.assert_close(guided[:, :3], null[:, :3] + 3.0 * (conditional[:, :3] - null[:, :3]))


def test_guidance_rescale_matches_diffusers_rescale_noise_cfg():
    """Lin et al. 2023 sec. 3.4 on random outputs, against diffusers' rescale_noise_cfg (phi = 0.7, their value)."""
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    x, t, labels = torch.randn(3, *SHAPE), torch.tensor([500, 400, 300]), torch.tensor([0, 1, 2])
    model = LearnedSigma()
    guided = ClassifierFreeGuidance(model, 5.0, rescale=0.7)(x, t, labels)
    conditional, null = model(x, t, labels)[:, :3], model(x, t, torch.full_like(labels, 3))[:, :3]
    expected = guider_utils.rescale_noise_cfg(null + 5.0 * (conditional - null), conditional, guidance_rescale=0.7)
    torch.testing.assert_close(guided[:, :3], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"phi must be in \[0, 1\]"):
        ClassifierFreeGuidance(model, 5.0, rescale=1.5)


# ----------------------------------------------------------------------------- every sampler


SIGMA_PARAMETRISED = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"}


@pytest.mark.parametrize("alias", list(ALIASES))
def test_leak_enters_x_T_in_each_samplers_own_units(alias):
    """x_T = a leak + b noise with (a, b) = (sqrt(ab_t0), sqrt(1 - ab_t0)) for samplers in x_t units and
    (1, sigma_t0 = sqrt((1 - ab) / ab)) for the sigma-parametrised ones (x_sigma = x_t / sqrt(ab)), computed here
    from alphas_cumprod; sample i draws its noise, then its leak, from its own generator."""
    stats = LeakStats.fit(torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1, kind="dct+pixel",
                          n_components=2)
    scheduler = from_config({"_class_name": "DDIMScheduler", **SCALED_LINEAR, "steps_offset": 1}, alias)
    scheduler.set_timesteps(10)
    t0 = float(scheduler.timesteps[0])
    assert t0 == int(t0), "leading spacing gives an integer first timestep"
    ab = scheduler.alphas_cumprod.double()[int(t0)]
    a, b = (1.0, ((1 - ab) / ab).sqrt()) if type(scheduler).__name__ in SIGMA_PARAMETRISED else (ab.sqrt(), (1 - ab).sqrt())
    generators = sample_generators(7, 0, 5)
    x_T = initial_noise(scheduler, (5, *SHAPE), leak=stats, generator=generators)
    expected = []
    for g in sample_generators(7, 0, 5):
        noise = torch.randn(1, *SHAPE, generator=g)
        expected.append(a * stats.sample(1, generator=g).double() + b * noise.double())
    torch.testing.assert_close(x_T.double(), torch.cat(expected), rtol=1e-5, atol=1e-5 * float(b))
    plain = initial_noise(scheduler, (5, *SHAPE), generator=sample_generators(7, 0, 5))
    assert float(scheduler.init_noise_sigma) == pytest.approx(float(plain.std() / torch.cat(
        [torch.randn(1, *SHAPE, generator=g) for g in sample_generators(7, 0, 5)]).std()), rel=1e-5)


@pytest.mark.parametrize("alias, schedule", [
    ("unipc", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp_2m", {**SCALED_LINEAR, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})])
def test_leak_x_T_is_at_the_first_noise_level_where_the_first_timestep_repeats(alias, schedule):
    """Karras sigmas on these schedules round the first timesteps to 999 several times; x_T is built at sigma_0,
    where the sampler starts (add_noise's diffusers rule would take the second entry's smaller sigma)."""
    scheduler = from_config({"_class_name": "DDIMScheduler", **schedule}, alias, use_karras_sigmas=True)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] == 999
    ab = scheduler.alphas_cumprod.double()[999]
    sigma = ((1 - ab) / ab).sqrt()  # Karras sigmas start at the last training timestep's noise level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero-SNR schedule's "a leak has no effect"
        x_T = initial_noise(scheduler, (2, *SHAPE), leak=torch.full(SHAPE, 0.5),
                            generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(x_T.double(), (0.5 + sigma * noise) / (sigma ** 2 + 1).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alias", ["dpmpp_2m", "unipc", "heun", "pndm", "euler_a"])
def test_multistep_state_is_reset_per_batch(alias):
    """Two batches give the images of one batch of the same samples (state reset by set_timesteps per batch);
    the Euler family's Karras sigmas give fractional timesteps, which reach the model untruncated (DPM-Solver
    rounds them, as diffusers does)."""
    karras = {"use_karras_sigmas": True} if alias in ("dpmpp_2m", "heun", "euler_a") else {}
    scheduler = from_config({"_class_name": "DDIMScheduler", **SCALED_LINEAR}, alias, **karras)
    seen = []

    denoiser = TinyDenoiser()

    def model(x, t, y=None):
        seen.append(t)
        return denoiser(x, t)

    whole = sample(model, scheduler, 4, shape=SHAPE, num_inference_steps=6, seed=1, batch_size=4, progress=False)
    split = sample(model, scheduler, 4, shape=SHAPE, num_inference_steps=6, seed=1, batch_size=2, progress=False)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)
    if alias in ("heun", "euler_a"):
        assert any(float(t[0]) != int(t[0]) for t in seen) and all(t.is_floating_point() for t in seen)

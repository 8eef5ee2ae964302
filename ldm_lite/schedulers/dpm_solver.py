"""DPM-Solver++ multistep sampler: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv:2211.01095), Algorithm 2 (multistep 2M) and its first- and third-order siblings;
algorithm_type="dpmsolver" is the noise-prediction solver of Lu et al. 2022, "DPM-Solver" (arXiv:2206.00927).

Notation: alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) (the VP pair; the table `sigmas` holds the VE ratio
sigma_t / alpha_t as the other sigma samplers do), lambda_t = log(alpha_t / sigma_t), h = lambda_t - lambda_s for a
step from s to t. x0 predictions (data prediction) or eps predictions (noise prediction) of the last 1-3 steps
are kept and combined by finite differences D0, D1, D2 in lambda.
"""
import numpy as np
import torch

from .base import SchedulerOutput, _check_choice, randn_tensor, threshold_sample
from .sigmas import (FINAL_SIGMAS_TYPES, SigmaScheduler, add_into, exponential_sigmas, final_sigma, karras_sigmas,
                     scale_into, sigma_to_timestep, sub_into, timestep_to_sigma)

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
# diffusers rewrites these (configs of its DEIS / UniPC schedulers loaded into this class)
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def dpm_solver_timesteps(num_inference_steps: int, num_train_timesteps: int, timestep_spacing: str,
                         steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """diffusers' DPM-Solver timesteps (int64, descending), which differ from the DDIM spacings.

    linspace: round(linspace(0, last - 1, N + 1)) without its final 0; leading: arange(N + 1) * (last // (N + 1))
    without its final 0, plus steps_offset; trailing: round(arange(last, 0, -T / N)) - 1. `last_timestep`
    (default T) ends the list early for lambda_min_clipped; with trailing spacing the list then has fewer than N
    entries (as diffusers).
    """
    T, N = num_train_timesteps, num_inference_steps
    if not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {N!r}")
    last = T if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":
        return np.linspace(0, last - 1, N + 1).round()[::-1][:-1].astype(np.int64)
    if timestep_spacing == "leading":
        return (np.arange(0, N + 1) * (last // (N + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(last, 0, -T / N).round().astype(np.int64) - 1


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver(++) multistep with diffusers' keywords and defaults; one model call per step (N for N steps).

    algorithm_type: "dpmsolver++" (data prediction, ODE), "sde-dpmsolver++" (data prediction, SDE: fresh noise
    every step), "dpmsolver" (noise prediction, ODE; needs final_sigmas_type="sigma_min"). solver_order 1-3: the
    first steps use lower orders until enough outputs are stored. solver_type: how the 2nd-order term is taken,
    "midpoint" (DPM-Solver++ Alg. 2) or "heun" (the Taylor form; 3rd order always uses it).
    lower_order_final: with fewer than 15 steps, use 1st order on the last step and at most 2nd on the one before;
    euler_at_final: 1st order on the last step always; final_sigmas_type="zero" implies it too.
    lambda_min_clipped: timesteps whose lambda is below it are dropped (cosine schedules). thresholding:
    dynamic thresholding of each x0 estimate (Imagen). Karras / exponential sigmas span sigma(0) .. sigma(T-1) and
    their timesteps are rounded to integers (truncated for squaredcos_cap_v2), as diffusers does.

    Differences from diffusers 0.42: with variance_type learned / learned_range the first C channels of a 2C-channel
    output are used (diffusers takes the first 3 whatever C); before set_timesteps, add_noise pairs every training
    timestep with its own sigma (diffusers pairs t with sigma(T - 1 - t)); a timestep not in the list is an error
    (diffusers falls back to the last step); a zero-length step (Karras or exponential sigmas with
    final_sigmas_type="sigma_min" end on sigma(0) twice) is taken at first order and returns x unchanged, where
    diffusers' "heun" and 3rd-order terms divide 0 by 0 (NaN); where the noise level rises (zero-SNR table, see
    SigmaScheduler.init_noise_sigma) sde-dpmsolver++ takes the ODE step (diffusers: NaN). step() returns
    pred_original_sample=None, as diffusers does.
    Refused: algorithm_type "sde-dpmsolver" (deprecated in diffusers), flow sigmas / flow_prediction, Lu lambdas,
    beta sigmas and dynamic shifting (keywords accepted at their defaults only); flow_shift and time_shift_type
    act only with those and are kept in the config unused.
    """

    init_noise_sigma = 1.0  # the sampler works on x_t (VP), started from unit Gaussian noise
    x_sigma_tables = False

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        config = self._keyword_arguments(locals())
        config["algorithm_type"] = algorithm_type = _ALGORITHM_ALIASES.get(algorithm_type, algorithm_type)
        config["solver_type"] = solver_type = _SOLVER_ALIASES.get(solver_type, solver_type)
        if algorithm_type == "sde-dpmsolver":
            raise ValueError("algorithm_type='sde-dpmsolver' is deprecated in diffusers and not supported; "
                             "use 'sde-dpmsolver++'")
        _check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        _check_choice("solver_type", solver_type, SOLVER_TYPES)
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("variance_type", variance_type, (None, "learned", "learned_range"))
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver' (its last "
                             "step would divide by sigma = 0); use final_sigmas_type='sigma_min'")
        for name in ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            if config[name]:
                raise ValueError(f"{name}=True is not supported by ldm_lite's DPMSolverMultistepScheduler")
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        self._init_schedule(config)
        # lambda_t = log(alpha_t) - log(sigma_t) per training timestep (T,), for lambda_min_clipped
        self.lambda_t = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))

    def _reset_state(self):
        self.model_outputs = []  # converted outputs (x0 or eps) of the last solver_order steps, oldest first

    def scale_model_input(self, sample, timestep=None):
        """Identity: the network gets x_t itself."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps (N,) int64 and sigmas (N + 1,) float32 (see `dpm_solver_timesteps`); resets the history."""
        config, T = self.config, self.num_train_timesteps
        # lambda_min_clipped: drop the low-noise end of the schedule where lambda < the clip
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), config["lambda_min_clipped"]))
        timesteps = dpm_solver_timesteps(num_inference_steps, T, config["timestep_spacing"], config["steps_offset"],
                                         T - clipped)
        if config["use_karras_sigmas"] or config["use_exponential_sigmas"]:
            # new sigmas over the whole training range; their timesteps rounded (not for cosine) then truncated
            make = karras_sigmas if config["use_karras_sigmas"] else exponential_sigmas
            sigmas = make(self.train_sigmas[0].item(), self.train_sigmas[-1].item(), num_inference_steps)
            timesteps = sigma_to_timestep(sigmas, self.train_sigmas)
            if config["use_karras_sigmas"] and config["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = timestep_to_sigma(timesteps, self.train_sigmas)
        sigmas = np.append(sigmas, final_sigma(self.train_sigmas, config["final_sigmas_type"]))
        self._set_table(timesteps.astype(np.int64), sigmas, device, timestep_dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._coefficients = self._step_coefficients()

    def _noised(self, original_samples, noise, sigma):
        """Forward process x_t = alpha_t x0 + sigma_t noise (B, ...) at the VE noise level sigma (`add_noise` for
        timesteps (B,) taken from `timesteps`)."""
        alpha_t, sigma_t = _vp(sigma)
        return alpha_t * original_samples + sigma_t * noise

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample, generator=None, variance_noise=None) -> SchedulerOutput:
        """One multistep update x_s -> x_t (s = timesteps[i], t = the next listed timestep, or the end).

        model_output: (B, C, H, W) network output at x_s = `sample` (B, C, H, W) ((B, 2C, H, W) with a learned
        variance_type). sde-dpmsolver++ draws z from `generator` (one torch.Generator or a list, one per sample)
        on every step, or takes it as `variance_noise` (B, C, H, W).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        index = self._current_index(timestep)
        order = self._order_for_step(index)
        self.model_outputs = (self.model_outputs + [self._convert_output(model_output, sample, index)])[
            -self.config["solver_order"]:]
        sample = sample.to(torch.float32)
        noise = None
        if self.config["algorithm_type"] == "sde-dpmsolver++":
            noise = variance_noise.to(model_output.device, torch.float32) if variance_noise is not None else \
                randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
        if self._sigma_values[index + 1] == self._sigma_values[index]:
            # a zero-length step (Karras / exponential sigmas end on sigma(0), as does final_sigmas_type="sigma_min"):
            # h = 0 makes the higher-order terms 0 / 0 (NaN in diffusers); the first-order update returns x exactly
            order = 1
        prev_sample = self._update(index, order, sample, noise, own_noise=variance_noise is None)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.to(model_output.dtype), pred_original_sample=None)

    def _order_for_step(self, index: int) -> int:
        """Warm-up: order k needs k stored outputs; near the end, lower orders keep few-step sampling stable."""
        config, steps = self.config, len(self.timesteps)
        order = min(config["solver_order"], len(self.model_outputs) + 1)
        few_steps = config["lower_order_final"] and steps < 15
        if index == steps - 1 and (config["euler_at_final"] or few_steps or config["final_sigmas_type"] == "zero"):
            return 1
        if index == steps - 2 and few_steps:
            return min(order, 2)
        return order

    def _convert_output(self, model_output, sample, index: int):
        """The network output as an x0 estimate (data prediction, ++ solvers) or an eps estimate (dpmsolver),
        with dynamic thresholding applied to x0 (Lu et al. 2022b sec. 4, Saharia et al. 2022)."""
        channels = sample.shape[1]
        if self.config["variance_type"] is not None and model_output.shape[1] == 2 * channels:
            model_output = model_output[:, :channels]  # drop the learned-variance half
        alpha_t, sigma_t = self._coefficients["alpha"][index], self._coefficients["sigma"][index]
        prediction, thresholding = self.prediction_type, self.config["thresholding"]
        if self.config["algorithm_type"] != "dpmsolver":
            if prediction == "epsilon":
                x0 = sub_into(sample, sigma_t * model_output).div_(alpha_t)  # (x - sigma_t eps) / alpha_t
            elif prediction == "v_prediction":
                x0 = sub_into(alpha_t * sample, sigma_t * model_output)
            else:
                x0 = model_output
            return self._threshold(x0) if thresholding else x0
        if prediction == "epsilon":
            eps = model_output
        elif prediction == "v_prediction":
            eps = alpha_t * model_output + sigma_t * sample
        else:
            eps = (sample - alpha_t * model_output) / sigma_t
        if thresholding:
            x0 = self._threshold((sample - sigma_t * eps) / alpha_t)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _threshold(self, x0):
        return threshold_sample(x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])

    def _step_coefficients(self) -> dict:
        """Every scalar of the trajectory's steps, computed at once as vectors over the steps and split into 0-d
        tensors: {name: tuple with one per step} ("alpha", "sigma": one per table entry, N + 1).

        float32 in diffusers' operation order: elementwise ops give the same bits on a vector as on the 0-d tensors
        that diffusers computes in every step. Names: "sample" a, "c0" .. "c2" (c1 in the midpoint and the
        Taylor ("heun") form) and "noise" n of x_t = a x_s + sum_k c_k D_k + n z; "inv_r0", "inv_r1", "r0_share",
        "inv_r01" for the divided differences; "ode_step" (sde-dpmsolver++ only, booleans) where the noise level
        rises and the step is the ODE one. Entries before the first step (r0 at step 0, ...) are unused.
        """
        config = self.config
        alpha, sigma = _vp(self.sigmas)  # (N + 1,) the VP pair of every table entry
        lambdas = _log_snr(alpha, sigma)
        s = torch.arange(len(self.timesteps))  # step s goes from entry s to s + 1
        lambda_s0, lambda_s1, lambda_s2 = lambdas[s], lambdas[(s - 1).clamp(min=0)], lambdas[(s - 2).clamp(min=0)]
        h = lambdas[s + 1] - lambda_s0
        r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        ends = (alpha[s + 1], sigma[s + 1], alpha[s], sigma[s], h)
        table = dict(alpha=alpha, sigma=sigma, inv_r0=1.0 / r0, **_solver_coefficients(config["algorithm_type"], *ends))
        if config["algorithm_type"] == "sde-dpmsolver++":
            # the noise level rises (only on the clamped zero-SNR table, sigma(999) < sigma(996..998)): no reverse
            # SDE step goes up, and sqrt(1 - e^{-2h}) would be NaN (as in diffusers); take the ODE step instead
            rising = h < 0
            ode = _solver_coefficients("dpmsolver++", *ends)
            table.update({name: torch.where(rising, ode[name], table[name]) for name in ode})
            table["ode_step"] = rising.tolist()
        if config["solver_order"] == 3:
            table.update(inv_r1=1.0 / r1, r0_share=r0 / (r0 + r1), inv_r01=1.0 / (r0 + r1))
        else:
            table.pop("c2")
        if config["solver_type"] == "heun":  # the Taylor form at every order
            table.pop("c1_midpoint")
        elif config["solver_order"] < 3:  # the midpoint form (3rd order uses the Taylor one, its warm-up midpoint)
            table.pop("c1_heun")
        return {name: value.unbind() if isinstance(value, torch.Tensor) else value for name, value in table.items()}

    def _update(self, index: int, order: int, sample, noise, own_noise: bool = False):
        """x_t = a x_s + sum_k c_k D_k (+ n z): the order-k multistep formula of the chosen algorithm.

        D0 = m0 (latest output); D1, D2 are divided differences of the stored outputs in lambda, scaled by h.
        The midpoint 2nd order is DPM-Solver++(2M), Alg. 2; the "heun" (Taylor) 2nd-order and the 3rd-order forms
        and the SDE variant follow the authors' reference implementation, as diffusers does (`_solver_coefficients`).
        Each product and sum is one float32 operation in diffusers' order, so trajectories agree to the last bits;
        temporaries are overwritten in place (own_noise: z was drawn here and may be too).
        """
        coefficients = self._coefficients
        heun_form = order == 3 or self.config["solver_type"] == "heun"
        c1 = coefficients["c1_heun" if heun_form else "c1_midpoint"][index] if order > 1 else None
        terms = [coefficients["c0"][index], c1, coefficients["c2"][index] if order == 3 else None]
        prev_sample = coefficients["sample"][index] * sample
        for k, difference in enumerate(self._differences(order, index)):
            # D1, D2 are temporaries: scale them in place
            term = scale_into(terms[k], difference) if k else terms[k] * difference
            prev_sample = _accumulate(prev_sample, term)
        if noise is not None and not coefficients["ode_step"][index]:
            n = coefficients["noise"][index]
            prev_sample = _accumulate(prev_sample, scale_into(n, noise) if own_noise else n * noise)
        return prev_sample

    def _differences(self, order: int, index: int):
        """[D0, D1, D2][:order] from the stored outputs m0 (latest), m1, m2 and the step ratios r_k = h_k / h:
        D1 = (m0 - m1) / r0 at 2nd order; at 3rd, with d1_0 = (m0 - m1) / r0 and d1_1 = (m1 - m2) / r1,
        D1 = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1) and D2 = (d1_0 - d1_1) / (r0 + r1)."""
        m = self.model_outputs[::-1]  # m0, m1, m2
        if order == 1:
            return [m[0]]
        coefficients = self._coefficients
        d1_0 = scale_into(coefficients["inv_r0"][index], m[0] - m[1])
        if order == 2:
            return [m[0], d1_0]
        d1_1 = scale_into(coefficients["inv_r1"][index], m[1] - m[2])
        spread = sub_into(d1_0, d1_1)  # d1_0 - d1_1, once (diffusers computes it twice, with the same bits)
        d1 = add_into(coefficients["r0_share"][index] * spread, d1_0)
        return [m[0], d1, scale_into(coefficients["inv_r01"][index], spread)]


def _solver_coefficients(algorithm: str, alpha_t, sigma_t, alpha_s0, sigma_s0, h) -> dict:
    """a ("sample"), c0, c1 (midpoint and Taylor forms), c2 and n ("noise", SDE only) of a step from s0 to t.

    Any shape (vectors over the steps); float32 expressions exactly as diffusers writes them.
    """
    if algorithm == "dpmsolver++":
        # data prediction, ODE: first order x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0 (DDIM)
        phi = torch.exp(-h) - 1.0
        return dict(sample=sigma_t / sigma_s0, c0=-(alpha_t * phi), c1_midpoint=-(0.5 * (alpha_t * phi)),
                    c1_heun=alpha_t * (phi / h + 1.0), c2=-(alpha_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)))
    if algorithm == "sde-dpmsolver++":
        # data prediction, SDE: the sample decays by e^{-h} more and fresh noise refills it
        decay = 1 - torch.exp(-2.0 * h)
        return dict(sample=sigma_t / sigma_s0 * torch.exp(-h), c0=alpha_t * decay, c1_midpoint=0.5 * (alpha_t * decay),
                    c1_heun=alpha_t * (decay / (-2.0 * h) + 1.0),
                    c2=alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
                    noise=sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)))
    # noise prediction, ODE: first order x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps (DPM-Solver-1)
    phi = torch.exp(h) - 1.0
    return dict(sample=alpha_t / alpha_s0, c0=-(sigma_t * phi), c1_midpoint=-(0.5 * (sigma_t * phi)),
                c1_heun=-(sigma_t * (phi / h - 1.0)), c2=-(sigma_t * ((torch.exp(h) - 1.0 - h) / h ** 2 - 0.5)))


def _accumulate(total, term):
    """total + term, added into `total` (a temporary) when that keeps the result's dtype."""
    if torch.promote_types(total.dtype, term.dtype) == total.dtype and total.shape == term.shape:
        return total.add_(term)
    return total + term


def _vp(sigma):
    """(alpha_t, sigma_t) of the VP process for the VE ratio sigma = sigma_t / alpha_t (any shape)."""
    alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _log_snr(alpha_t, sigma_t):
    """lambda = log(alpha_t) - log(sigma_t), half the log signal-to-noise ratio (+inf at sigma_t = 0)."""
    return torch.log(alpha_t) - torch.log(sigma_t)

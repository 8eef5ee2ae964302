"""UniPC multistep sampler: Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models" (arXiv:2302.04867).

Notation (DPM-Solver's, Lu et al. 2022, arXiv:2206.00927): x_t = alpha_t x0 + sigma_t eps with alpha_t =
sqrt(ab_t), sigma_t = sqrt(1 - ab_t), log-SNR lambda_t = log(alpha_t / sigma_t); a step from s to t has
h = lambda_t - lambda_s. The model output is converted to m = x0 (data prediction, `predict_x0`, UniPC's default)
or m = eps (noise prediction). With past outputs m_k at earlier steps s_k, r_k = (lambda_{s_k} - lambda_s) / h and
D_k = (m_k - m_0) / r_k, one update of order p is (eq. 8-9 and the algorithms of the paper; data-prediction form,
hh = -h):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) m_0 - alpha_t B sum_k rho_k D_k,
with B = hh ("bh1") or e^hh - 1 ("bh2") and rho solving R rho = g, R_ik = r_k^(i-1), g_i = i! hh phi_{i+1}(hh) / B
(phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z). The predictor UniP uses the p - 1 past outputs
(rho = 1/2 for p = 2); the corrector UniC adds D_p = m(x_t) - m_0 (r_p = 1) once the model has been called at the
predicted x_t, and the corrected x_t is what the next step starts from. The noise-prediction form has hh = h and
alpha, sigma swapped: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^hh - 1) m_0 - sigma_t B sum_k rho_k D_k.
"""
import numpy as np
import torch

from ..schedules import make_timesteps
from .base import SchedulerOutput, _check_choice, threshold_sample
from .sigmas import (FINAL_SIGMAS_TYPES, SigmaScheduler, add_into, final_sigma, karras_sigmas, scale_into,
                     sigma_to_timestep, sub_into, timestep_to_sigma)

SOLVER_TYPES = ("bh1", "bh2")
LEGACY_SOLVER_TYPES = ("midpoint", "heun", "logrho")  # DPM-Solver names diffusers maps to "bh2"
# keywords taken only at diffusers' defaults: flow matching, beta / exponential sigmas, an external predictor
ONLY_AT_DEFAULT = dict(solver_p=None, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                       flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential", shift_terminal=None)


class UniPCMultistepScheduler(SigmaScheduler):
    """UniPC with diffusers' keywords and defaults; the sample is x_t (DDPM units, init_noise_sigma = 1).

    solver_order p (2 for guided sampling, 3 unconditional); lower_order_final: the last steps use order
    min(p, steps left); disable_corrector: step indices whose result is not corrected; use_karras_sigmas: N
    Karras sigmas (Karras et al. 2022, arXiv:2206.00364, eq. 5) between sigma(0) and sigma(T-1) (or sigma_min,
    sigma_max when given), with rounded timesteps; final_sigmas_type: end at sigma 0 or sigma(0) (with Karras
    sigmas: at the last Karras sigma). Timestep spacing: `linspace` and `leading` space
    N + 1 points and drop the last (0), `trailing` as DDIM. With rescale_betas_zero_snr the last alpha_bar is
    2^-24 (diffusers' clamp, so sigma stays finite).

    Differences from diffusers, where its formulas break down:
    - A step to sigma = 0 (h = inf) returns the x0 estimate, the first-order update's limit (higher orders
      diverge there: D_k grows like h). diffusers evaluates the formulas at h = inf: inf or NaN with
      solver_type="bh1", predict_x0=False or lower_order_final=False (a singular solve for p = 3).
    - A step to the same sigma (h = 0: Karras sigmas with final_sigmas_type="sigma_min" end on sigma_min twice)
      returns the sample, the update's limit; diffusers divides by h and gets NaN above first order.
    - When rounding repeats the first timestep (Karras sigmas on the cosine or zero-SNR schedules), the trajectory
      starts at index 0 (the shared SigmaScheduler rule); diffusers starts at the second place, skips the
      first sigma and fails on the last call.
    """

    init_noise_sigma = 1.0  # the sample is x_t, not x_sigma
    x_sigma_tables = False

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector=(), solver_p=None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential", sigma_min=None,
                 sigma_max=None, shift_terminal=None):
        config = self._keyword_arguments(locals())
        for key, default in ONLY_AT_DEFAULT.items():
            if config[key] != default:
                raise ValueError(f"{key}={config[key]!r} is not supported by ldm_lite's UniPC (only {default!r})")
        if solver_type in LEGACY_SOLVER_TYPES:
            config["solver_type"] = solver_type = "bh2"  # as diffusers: a DPM-Solver config loads as bh2
        _check_choice("solver_type", solver_type, SOLVER_TYPES)
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        if not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"solver_order must be an integer >= 1, got {solver_order!r}")
        config["disable_corrector"] = list(disable_corrector)
        self._init_schedule(config)

    # ---- timesteps -------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps (N,) int64 and sigmas (N + 1,) float32 (the last: 0 or sigma(0)); resets the multistep state."""
        config, T, N = self.config, self.num_train_timesteps, num_inference_steps
        spacing, offset = config["timestep_spacing"], config["steps_offset"]
        if spacing == "trailing":
            timesteps = make_timesteps(N, T, spacing, offset).numpy()
        else:  # N + 1 rounded points from T - 1 down to 0 (plus offset), the last one dropped
            if not isinstance(N, int) or not 1 <= N < T:
                raise ValueError(f"num_inference_steps must be an integer in [1, {T - 1}] ({spacing} spacing "
                                 f"places N + 1 points), got {N!r}")
            timesteps = make_timesteps(N + 1, T, spacing, offset).numpy()[:-1]
        if config["use_karras_sigmas"]:
            low = config["sigma_min"] if config["sigma_min"] is not None else self.train_sigmas[0].item()
            high = config["sigma_max"] if config["sigma_max"] is not None else self.train_sigmas[-1].item()
            sigmas = karras_sigmas(low, high, N)
            timesteps = np.round(sigma_to_timestep(sigmas, self.train_sigmas.numpy()))
            last = sigmas[-1] if config["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sigmas = timestep_to_sigma(timesteps, self.train_sigmas.numpy())
            last = final_sigma(self.train_sigmas, config["final_sigmas_type"])
        self.num_inference_steps = len(timesteps)
        self._set_table(timesteps, np.append(sigmas, last), device, timestep_dtype=torch.int64)
        # alpha_t, sigma_t and lambda_t of every entry (N + 1,) float32, as diffusers derives them from sigma
        alpha = 1 / (self.sigmas ** 2 + 1) ** 0.5
        sigma = self.sigmas * alpha
        self._lambda = torch.log(alpha) - torch.log(sigma)  # +inf at a final sigma of 0
        self._alpha, self._sigma = alpha.unbind(), sigma.unbind()  # 0-d tensors, one per entry
        self._coefficients = self._step_coefficients(alpha, sigma)

    def _reset_state(self):
        self.model_outputs = []  # converted outputs of the last solver_order steps, newest last
        self.last_sample = None  # the sample the last predictor started from (the corrector redoes that step)
        self.lower_order_nums = 0
        self._this_order = None

    def scale_model_input(self, sample, timestep=None):
        """Identity: UniPC's sample is already the network input x_t."""
        return sample

    def _noised(self, original_samples, noise, sigma):
        """x_t = alpha x0 + sigma noise (B, ...) at the VE noise level sigma (`add_noise`: the level of each
        listed timestep (B,), diffusers' convention: with Karras sigmas the level of the step, not of the
        training timestep)."""
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        return alpha * original_samples + (sigma * alpha) * noise

    # ---- the step ------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample) -> SchedulerOutput:
        """Correct the previous step with this model output, then predict the next sample (UniPC, Algorithm 3).

        model_output: epsilon / v / x0 prediction (B, C, H, W) at x_t = `sample` (B, C, H, W), t = `timestep`.
        Returns prev_sample (B, C, H, W); pred_original_sample is None (diffusers gives none).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        index = self._current_index(timestep)
        converted = self._convert_model_output(model_output, sample, index)
        if index > 0 and self.last_sample is not None and index - 1 not in self.config["disable_corrector"]:
            # UniC: redo step index-1 -> index with the new output; it costs no extra model call
            sample = self._update(self.last_sample, index - 1, self._this_order, converted)
        self.model_outputs = (self.model_outputs + [converted])[-self.config["solver_order"]:]
        order = self.config["solver_order"]
        if self.config["lower_order_final"]:
            order = min(order, len(self.timesteps) - index)
        self._this_order = min(order, self.lower_order_nums + 1)  # warm-up: as many past outputs as there are
        self.last_sample = sample
        sigma, sigma_next = self._sigma_values[index], self._sigma_values[index + 1]
        if sigma_next == 0:
            prev_sample = self._x0_estimate(converted, sample, index)
        elif sigma_next == sigma:  # Karras sigmas ending on sigma_min twice: h = 0
            prev_sample = sample
        else:
            prev_sample = self._update(sample, index, self._this_order)  # UniP
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config["solver_order"])
        self._step_index = index + 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=None)

    def _convert_model_output(self, model_output, sample, index: int):
        """The network output at step `index` as x0 (predict_x0, then thresholded if asked) or as eps."""
        alpha, sigma = self._alpha[index], self._sigma[index]
        prediction = self.prediction_type
        if self.config["predict_x0"]:
            if prediction == "epsilon":
                x0 = sub_into(sample, sigma * model_output).div_(alpha)  # (x - sigma eps) / alpha
            elif prediction == "sample":
                x0 = model_output
            else:  # v_prediction
                x0 = sub_into(alpha * sample, sigma * model_output)
            if self.config["thresholding"]:
                x0 = threshold_sample(x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])
            return x0
        if prediction == "epsilon":
            return model_output
        if prediction == "sample":
            return (sample - alpha * model_output) / sigma
        return alpha * model_output + sigma * sample

    def _x0_estimate(self, converted, sample, index: int):
        """x0 from the converted output at step `index`: the update's limit for a step to sigma = 0."""
        if self.config["predict_x0"]:
            return converted
        return (sample - self._sigma[index] * converted) / self._alpha[index]

    def _step_coefficients(self, alpha, sigma) -> dict:
        """The scalars of every step's predictor and corrector, computed at once as vectors over the steps (float32,
        diffusers' operation order: elementwise ops and batched solves give the same bits as diffusers' per-step
        0-d tensors and single solves), split into 0-d tensors.

        alpha, sigma: (N + 1,) VP pair of every entry. Returns {"factor", "m0", "residual": (N,) tuples of the
        update x_t = factor x_s - m0 coefficient * m_0 - residual coefficient * sum_k rho_k D_k, and for each
        (order, corrector): {"ratios": [r_1, ...], "rhos": [rho_1, ...]}, each a tuple with one per step}.
        Entries for steps that cannot take that order (too few past outputs) are unused.
        """
        config, lambdas = self.config, self._lambda
        source = torch.arange(len(self.timesteps))  # the update from entry s to s + 1
        target = source + 1
        h = lambdas[target] - lambdas[source]
        hh = -h if config["predict_x0"] else h
        h_phi_1 = torch.expm1(hh)  # e^hh - 1
        b_h = hh if config["solver_type"] == "bh1" else torch.expm1(hh)  # B(h)
        if config["predict_x0"]:
            scale, factor = alpha[target], sigma[target] / sigma[source]
        else:
            scale, factor = sigma[target], alpha[target] / alpha[source]
        table = dict(factor=factor.unbind(), m0=(scale * h_phi_1).unbind(), residual=(scale * b_h).unbind())
        for order in range(1, config["solver_order"] + 1):
            ratios = [(lambdas[(source - k).clamp(min=0)] - lambdas[source]) / h for k in range(1, order)]  # r_k
            stacked = torch.stack(ratios + [torch.ones_like(h)], dim=1)  # (N, order), r_order = 1
            ratios = [r.unbind() for r in ratios]
            for corrector in (False, True):
                rhos = self._rhos(stacked, hh, h_phi_1, b_h, order, corrector)  # (N, K)
                table[order, corrector] = dict(ratios=ratios, rhos=list(rhos.unbind(1)))
        return table

    def _update(self, sample, source: int, order: int, new_output=None):
        """One UniPC update of `order` from entry `source` to `source + 1` (eq. 8-9, module docstring).

        sample: x at `source`. The outputs m_0, m_1, ... are model_outputs[-1], [-2], ... (at source, source - 1,
        ...). new_output None: the predictor UniP, with order - 1 past differences. new_output (B, C, H, W): the
        corrector UniC, whose last difference is new_output - m_0 at r = 1. Scalars from `set_timesteps`
        (`_step_coefficients`); each tensor operation as diffusers' (temporaries overwritten in place).
        """
        coefficients = self._coefficients
        scalars = coefficients[order, new_output is not None]
        rhos = [rho[source].to(sample.dtype) for rho in scalars["rhos"]]
        m0 = self.model_outputs[-1]
        # D_k = (m_k - m_0) / r_k
        differences = [torch.sub(self.model_outputs[-1 - k], m0).div_(ratio[source])
                       for k, ratio in enumerate(scalars["ratios"], start=1)]
        first_order = sub_into(coefficients["factor"][source] * sample, coefficients["m0"][source] * m0)
        residual = None
        if len(differences) == 1 and differences[0].dtype == sample.dtype:
            residual = differences[0].mul_(rhos[0])  # the einsum below with one term: this product, same bits
        elif differences:
            stacked = torch.stack(differences, dim=1)  # (B, order - 1, C, H, W)
            residual = torch.einsum("k,bk...->b...", torch.stack(rhos[:len(differences)]), stacked)
        if new_output is not None:
            last = scale_into(rhos[-1], new_output - m0)  # rho_p D_p with r_p = 1
            residual = last if residual is None else add_into(residual, last)
        if residual is None:
            return first_order
        return sub_into(first_order, scale_into(coefficients["residual"][source], residual))

    @staticmethod
    def _rhos(ratios, hh, h_phi_1, b_h, order: int, corrector: bool):
        """rho (N, K) float32 for N steps at once: the solution of R rho = g (eq. 9); the predictor uses the first
        order - 1 rows and columns (K = order - 1; rho = 1/2 at order 2, as the paper's B(h) variant), the
        corrector all (K = order; rho = 1/2 at order 1). ratios: (N, order) with r_order = 1; hh, h_phi_1, b_h: (N,)."""
        steps = len(hh)
        if not corrector and order <= 2:
            return torch.full((steps, max(order - 1, 0)), 0.5)
        if corrector and order == 1:
            return torch.full((steps, 1), 0.5)
        rows, g = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1  # (e^hh - 1) / hh - 1 = hh phi_2(hh); next: hh phi_3(hh), ...
        for i in range(1, order + 1):
            rows.append(torch.pow(ratios, i - 1))
            g.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        matrix, g = torch.stack(rows, dim=1), torch.stack(g, dim=1)  # (N, order, order), (N, order)
        if not corrector:
            matrix, g = matrix[:, :-1, :-1], g[:, :-1]
        # solve_ex: no error for the singular matrices of steps that never take this order
        return torch.linalg.solve_ex(matrix, g)[0]

"""The study on real images, `python -m analysis study` (`QualityStudyConfig`): it trains the standard recipe (linear
schedule, epsilon, Ho et al. 2020) and its fixes (offset noise; input perturbation, DDPM-IP, Ning et al. 2023,
arXiv:2301.11706; zero terminal SNR) and puts FID / KID (Heusel et al. 2017; Binkowski et al. 2018) beside the bias
metrics: samplers against the number of model calls (NFE), epsilon scaling (Ning et al. 2023, arXiv:2308.15321)
picked by FID and by the eps-norm, the signal leak, and the fixes. A plan fitted to `--minutes` drops the most
expensive evaluations first and says so."""
import dataclasses
import datetime
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ldm_lite import exposure, metrics, plots
from ldm_lite.data import save_image_grid, to_float, to_uint8
from ldm_lite.distributed import init_world
from ldm_lite.fid_reference import held_out_images, reference_images, reference_path, reference_statistics
from ldm_lite.leak import LeakStats
from ldm_lite.models.inception import load_fid_inception
from ldm_lite.run_safety import FolderLock
from ldm_lite.schedulers import from_config
from ldm_lite.study.config import CLASS_NAMES, QualityStudyConfig, grid_scale
from ldm_lite.study.demo import class_rows, load_study_data, load_test_split, save_class_grid
from ldm_lite.study.evaluate import Evaluator, offset_training_noise
from ldm_lite.study.findings import CLIPPED, quality_findings, significant
from ldm_lite.study.plan import (LEAK, PLAIN, REPORT_SECONDS, Clock, Plan, extra_seconds, leak_models,
                                 measure_speed, plan_study, setting_seconds, study_parts)
from ldm_lite.study.report import format_quality_results, write_report
from ldm_lite.study.results import QualityResults, save_results
from ldm_lite.study.resume import check_study_settings, first_choices, record_choices, saved_extra
from ldm_lite.study.shards import Shards
from ldm_lite.study.training import (external_model, model_row, shared_precision, train_study_models,
                                     trained_record)


def study_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


STAGES = (("fixes", "terciles", "part 4 (fixes)"), ("leak", "steering", "part 3 (signal leak)"),
          ("eps", "scan", "part 2 (epsilon scaling)"), ("samplers", None, "part 1 (samplers)"))


def run_evaluations(plan: Plan, parts: dict, models: dict, data, labels, evaluator: Evaluator, clock: Clock,
                    results: QualityResults) -> dict:
    """The evaluations in order of importance: part 4's settings then its tercile samples, part 3's then DC
    steering, part 2's then the eps-norm scan, part 1's by NFE. The base setting always runs; anything else that
    no longer fits in what is left of the budget (and a minute for the report) is skipped, and the report says
    so. The estimates follow the machine: after each setting, the rates are those it ran at.
    Returns {"rows": {setting key: row}, "terciles": rows, "steering": rows, "scan": scan or None}."""
    config, rates = evaluator.config, dict(results.speed)
    done = {"rows": {}, "terciles": [], "steering": [], "scan": None}
    extras = {"terciles": lambda: tercile_rows(models, data, labels, evaluator, results),
              "steering": lambda: steering_rows(models, data, labels, evaluator, parts["leak"], results),
              "scan": lambda: exposure_scan(models["standard"], data, evaluator)}
    for part, extra, title in STAGES:
        for setting in [s for s in plan.settings if s in parts[part] and s.key not in done["rows"]]:
            if done["rows"] and not _fits(setting.label, setting_seconds(setting, plan.samples, rates), clock,
                                          results):
                continue
            with clock(f"evaluate {title}"):
                row = evaluator.evaluate(setting, models[setting.model])
            done["rows"][setting.key] = row
            if not row.get("reused"):  # evaluated now, not read from an earlier run
                rates["calls_per_second"] = plan.samples * setting.nfe / row["sampling_seconds"]
                rates["seconds_after_sampling"] = row["seconds"] - row["sampling_seconds"]
        if extra in plan.extras and _fits(EXTRA_NAMES[extra], extra_seconds(config, rates)[extra], clock, results):
            with clock(EXTRA_NAMES[extra]):
                done[extra] = saved_extra(extra, extras[extra], models, evaluator, results.grids)
    results.speed["observed_calls_per_second"] = rates["calls_per_second"]
    return done


EXTRA_NAMES = {"terciles": "tercile samples (part 4)", "steering": "DC steering (part 3)",
               "scan": "eps-norm scan (part 2)"}


def _fits(label: str, seconds: float, clock: Clock, results: QualityResults) -> bool:
    """Whether `seconds` of work and a minute for the report fit in what is left; if not, say it was skipped."""
    if clock.left() >= seconds + REPORT_SECONDS:
        return True
    results.dropped.append(f"{label} skipped at run time: {max(clock.left(), 0) / 60:.1f} min of the budget were "
                              f"left and it needed about {seconds / 60:.1f} min, plus a minute for the report.")
    return False


def exposure_scan(trained: dict, data: torch.Tensor, evaluator: Evaluator) -> dict:
    """Part 2's exposure metric: `exposure.scan_eps_scale` on `exposure_images` training images (the standard
    model, DDIM at sample_steps, unconditional): per lambda the eps-norm gap between sampling and training."""
    config = evaluator.config
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:config.exposure_images]
    return exposure.scan_eps_scale(trained["model"], from_config(trained["config"]), data[chosen], config.lambdas,
                                  num_inference_steps=config.sample_steps, seed=config.seed,
                                  batch_size=config.eval_batch_size, class_labels=trained["model"].config.num_classes,
                                  progress=config.progress, autocast_dtype=evaluator.autocast_dtype)


def tercile_rows(models: dict, data, labels, evaluator: Evaluator, results: QualityResults) -> list:
    """Part 4's conditional view: per model and brightness tercile, samples_per_class samples asked for it (DDIM,
    sample_steps; the offset model from its own training noise), their mean brightness vs the tercile's."""
    config, rows = evaluator.config, []
    class_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(config.samples_per_class)
    for name, trained in models.items():
        scheduler = from_config(trained["config"])
        scheduler.set_timesteps(config.sample_steps)
        x_T = offset_training_noise(scheduler, data.shape[1:], len(class_labels), config.offset_noise,
                                    config.seed) if name == "offset" else None
        images = evaluator.draw(trained, scheduler, len(class_labels), config.sample_steps,
                                class_labels=class_labels, x_T=x_T)
        save_class_grid(images, class_labels, evaluator.out / f"grid_{name}_classes.png", config)
        results.grids[f"{name}: asked for dark / mid / bright (rows)"] = f"grid_{name}_classes.png"
        rows += class_rows(name, trained, scheduler, images, class_labels, data, labels, config.seed)
    return rows


def steering_rows(models: dict, data, labels, evaluator: Evaluator, leak_settings: list,
                  results: QualityResults) -> list:
    """Part 3's DC steering (Everaert et al. 2024), per model of part 3 whose leak-aware setting ran: the leak's DC
    coefficient of every channel fixed to the dark, then the bright tercile's channel mean. Sample i draws from the
    same generator as the leak-aware setting's sample i, so the share of the way to the target is measured against
    those paired, unsteered samples (the same leak but its DC term)."""
    config, rows, (channels, height, width) = evaluator.config, [], data.shape[1:]
    for setting in (s for s in leak_settings if s.start == LEAK and s.key in evaluator.images):
        trained, name = models[setting.model], setting.model
        unsteered = to_float(evaluator.images[setting.key][:config.samples_per_class])  # (n, C, H, W)
        scheduler, t0, kept = first_step(trained, config.sample_steps)
        for c in (0, len(CLASS_NAMES) - 1):
            means = data[labels == c].mean(dim=(0, 2, 3))  # (C,)
            leak = evaluator.leak.with_components({(k, (0, 0)): float(means[k]) * math.sqrt(height * width)
                                                   for k in range(channels)})
            images = evaluator.draw(trained, scheduler, len(unsteered), config.sample_steps, leak=leak,
                                    class_labels=trained["model"].config.num_classes)
            # both means from uint8 samples, as the leak-aware setting saved its own
            target, before = float(means.mean()), float(unsteered.mean())
            got = float(to_float(to_uint8(images)).mean())
            grid = f"grid_steered_{name}_{CLASS_NAMES[c]}.png"
            save_image_grid(images[:64], evaluator.out / grid, nrow=16, scale=grid_scale(config))
            results.grids[f"{name}, leak DC steered to the {CLASS_NAMES[c]} tercile"] = grid
            rows.append(dict(model=name, steered_to=CLASS_NAMES[c], t0=t0, sqrt_alpha_bar_t0=kept, n=len(images),
                             target_mean=target, unsteered_mean=before, samples_mean=got,
                             share=(got - before) / (target - before) if target != before else math.nan))
    return rows


def real_data_floor(config: QualityStudyConfig, images: torch.Tensor, reference_count: int,
                    evaluator: Evaluator) -> dict | None:
    """The row every quality table starts with: n held-out real images (n = the samples per setting) scored against
    the same reference, what a perfect model would score at that n. From the data's test split when it has one
    (`load_test_split`), else from the training images outside the reference; None when fewer than 4 remain."""
    test, source = load_test_split(config, evaluator.samples)
    held_out = held_out_images(images, reference_count, evaluator.samples, test)
    if len(held_out) < 4:  # KID draws two subsets of n // 2
        return None
    source = source or f"{config.data}: training images outside the reference"
    key = json.dumps({"real data": source, "n": len(held_out), "reference": evaluator.reference_name})
    row = evaluator.scored("real_data", key, lambda: held_out, {"source": source})
    return {name: row[name] for name in ("source", "kid", "kid_std", "fid", *BIAS_COLUMNS)}


def schedule_rows(models: dict, names: list, steps: int) -> list:
    """Per model of part 3: its schedule, spacing, first sampled timestep t0 at `steps` steps, and sqrt(alpha_bar)
    there, the share of the image that x_T keeps (Everaert et al.: the leak)."""
    rows = []
    for name in (n for n in names if n in models):
        scheduler, t0, kept = first_step(models[name], steps)
        rows.append(dict(model=name, schedule=scheduler.config["beta_schedule"], steps=steps,
                         spacing=scheduler.config["timestep_spacing"], t0=t0, sqrt_alpha_bar_t0=kept))
    return rows


def first_step(trained: dict, steps: int) -> tuple:
    """(the model's DDIM scheduler set to `steps` steps, its first timestep t0, sqrt(alpha_bar) at t0)."""
    scheduler = from_config(trained["config"])
    scheduler.set_timesteps(steps)
    t0 = int(scheduler.timesteps[0])
    return scheduler, t0, float(scheduler.alphas_cumprod[t0]) ** 0.5


def run_quality_study(config: QualityStudyConfig) -> QualityResults | None:
    """The study on real images: measure the machine, plan the budget, reference features (cached), train the
    models two at a time, evaluate every planned setting, then the tables, figures, findings and report.
    Under torchrun, rank 0 does all that and hands the sampling and Inception features out in shares (`Shards`);
    the other ranks serve it and return None."""
    device = study_device(config.device)
    # the other ranks wait in a collective while rank 0 trains: a timeout beyond the whole budget
    world = init_world(device.type, timeout=datetime.timedelta(minutes=2 * config.minutes + 30))
    device = world.device if world.size > 1 else device
    shards = Shards(world, device, config)
    if not world.is_main:
        return shards.serve()
    # no collective after an error (the other ranks may be inside a job): rank 0 exits, and torchrun stops them
    with FolderLock(config.out):  # one study per folder
        results = _run_quality_study(config, device, shards)
    shards.close()
    return results


def _run_quality_study(config: QualityStudyConfig, device: torch.device, shards: Shards) -> QualityResults:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_study_settings(config, out, record=False)
    clock = Clock(config.minutes)
    with clock("load data"):
        dataset = load_study_data(config)
    check_study_settings(config, out)  # the data are good: record the settings
    data = to_float(dataset.images)
    with clock("load the FID network"):
        network = shards.network = load_fid_inception(device)
    with clock("measure speed"):
        speed = measure_speed(config, data.shape[1], network, device, shards.world.size)
    names, parts = ["standard", *config.fix_names], study_parts(config)
    train_needed = not config.unet_from and any(name not in trained_record(out) for name in names)
    kept = first_choices(out, speed)
    cached = lambda count: reference_path(reference_images(dataset.images, count), config.cache).is_file()  # noqa: E731
    plan = plan_study(config, parts, speed, cached, train_needed, clock.left(), *(kept or (None, None)))
    if kept is None:
        record_choices(out, plan, speed)
    chosen = reference_images(dataset.images, plan.reference)
    ref_path = reference_path(chosen, config.cache)
    computed = not ref_path.is_file()
    with clock("reference features"):
        reference = reference_statistics(ref_path, chosen, shards.features, source=f"{config.data}: {len(chosen)} "
                                         f"training images at {config.resolution} px")
    if computed:  # thousands of images measure the Inception rate better than the start-up run
        speed["inception_per_second"] = len(chosen) / clock.parts["reference features"]
    if not config.unet_from:
        config = shared_precision(config, names, data.shape[1], device)
    models = {"standard": external_model(config, data.shape[1], device)} if config.unet_from else \
        train_study_models(config, names, clock, plan, device, data.shape[1])
    with clock("leak statistics"):
        leak = LeakStats.fit_batches(data.split(1024), "dct+pixel", 3)
    evaluator = Evaluator(config, device, torch.bfloat16 if speed["autocast"] == "bf16" else None, shards,
                          reference, ref_path.name, to_float(chosen), leak, plan.samples, out)
    results = QualityResults(config=dataclasses.asdict(config), speed=speed, dropped=list(plan.dropped),
                             estimates=plan.estimates, samples=plan.samples,
                             reference={"path": str(ref_path), "images": len(chosen), "source": reference.source},
                             models=[model_row(name, trained) for name, trained in models.items()])
    with clock("real-data floor"):
        floor = real_data_floor(config, dataset.images, len(chosen), evaluator)
    done = run_evaluations(plan, parts, models, data, dataset.labels, evaluator, clock, results)
    results.tables = quality_tables(parts, done["rows"], done["scan"], done["terciles"], done["steering"])
    results.tables["floor"] = [floor] if floor else []
    results.tables["schedules"] = schedule_rows(models, leak_models(config), config.sample_steps)
    with clock("figures"):
        quality_figures(parts, done["scan"], evaluator, results)
    results.findings = quality_findings(results.tables)
    results.timings = clock.parts
    results.total_seconds = time.monotonic() - clock.start
    save_results(results, out / "results.json")
    write_report(results, out / "report.html")
    (out / "report.md").write_text(format_quality_results(results, markdown=True))
    return results


# ----------------------------------------------------------------------------- tables and figures

IDENTITY = {"samplers": ("sampler", "x0_clipping", "level", "nfe", "steps", "t0"),
            "eps": ("eps_scale", "eps_slope", "steps"), "leak": ("model", "start"), "fixes": ("model", "start")}
BIAS_COLUMNS = ("w1", "w1_sd", "ks", "std_ratio", "mean", "hf_log10", "n", "seconds")


def quality_tables(parts: dict, rows: dict, scan: dict, terciles: list, steering: list) -> dict:
    """The report's tables, each led by KID (see `comparison_rows`) against its baseline: unclipped DDIM at the
    same NFE (part 1, whose sampler column names the variant: `sampler_label`), lambda 1 (part 2), the same model
    from plain noise (part 3), the standard model (part 4)."""
    samplers = parts["samplers"]

    def same_level(setting):
        peers = [s for s in samplers if s.level == setting.level and s.key in rows]
        # without unclipped DDIM the rows say "no baseline"
        return next((s for s in peers if (s.sampler, s.clip_sample, s.spacing) == ("ddim", False, None)), None)

    scanned = [dict(eps_scale=c, eps_norm_gap=g) for c, g in zip(scan["candidates"], scan["gap"])] if scan else []
    gaps = {row["eps_scale"]: row["eps_norm_gap"] for row in scanned}  # the scan holds constant lambdas only
    eps = comparison_rows(parts["eps"], rows, IDENTITY["eps"], lambda s: replace(s, eps_scale=1.0, eps_slope=0.0))
    for row in eps:
        row["eps_norm_gap"] = math.nan if row["eps_slope"] else gaps.get(row["eps_scale"], math.nan)
    sampler_rows = comparison_rows(samplers, rows, IDENTITY["samplers"], same_level)
    for row, setting in zip(sampler_rows, [s for s in samplers if s.key in rows]):
        row["sampler"] = sampler_label(setting, row["x0_clipping"])
    return {"samplers": sampler_rows, "eps": eps,
            "leak": comparison_rows(parts["leak"], rows, IDENTITY["leak"], lambda s: replace(s, start=PLAIN)),
            "scan": scanned, "steering": steering, "terciles": terciles,
            "fixes": comparison_rows(parts["fixes"], rows, IDENTITY["fixes"], lambda s: parts["fixes"][0])}


def sampler_label(setting, x0_clipping: str) -> str:
    """Part 1's name of a setting's sampler: its alias, its spacing when not the run's, and whether it clipped
    x0 (the row's x0_clipping), e.g. "ddim (quadratic spacing)", "ddim (x0 clipped)"."""
    label = setting.sampler + (f" ({setting.spacing} spacing)" if setting.spacing else "")
    return label + (CLIPPED if x0_clipping != "off" else "")


def comparison_rows(settings: list, rows: dict, identity: tuple, baseline_of) -> list:
    """Rows of the evaluated `settings` led by KID: the identity columns, kid, kid_std, fid, the KID difference to
    the baseline setting (`baseline_of(setting)`) and whether it exceeds two standard deviations
    (sqrt(kid_std^2 + kid_std_baseline^2)), then the bias metrics (BIAS_COLUMNS)."""
    table = []
    for setting in settings:
        if setting.key not in rows:
            continue
        baseline = baseline_of(setting)
        row, base = rows[setting.key], rows.get(baseline.key) if baseline is not None else None
        entry = {name: row[name] for name in identity}
        entry.update(kid=row["kid"], kid_std=row["kid_std"], fid=row["fid"])
        if base is None:
            entry.update(kid_diff=math.nan, beyond_2sd="no baseline")
        else:
            difference, beyond = significant(row, base, "kid", "kid_std")
            entry.update(kid_diff=difference, beyond_2sd="baseline" if base is row else "yes" if beyond else "no")
        entry.update({name: row[name] for name in BIAS_COLUMNS})
        table.append(entry)
    return table


def quality_figures(parts: dict, scan: dict | None, evaluator: Evaluator, results: QualityResults) -> None:
    """FID against NFE, the epsilon-scaling plots, the brightness summary and one sample grid per setting (each
    figure whose evaluations ran)."""
    out, tables, figures = evaluator.out, results.tables, results.figures
    if tables["samplers"]:
        figures["fid_nfe"] = plots.plot_fid_nfe(tables["samplers"], out / "fid_nfe.png").name
    if scan is not None:
        constant = [row for row in tables["eps"] if not row["eps_slope"]]  # the sloped schedules are not on the axis
        figures["eps_quality"] = plots.plot_eps_scale_quality(constant, out / "eps_scale_quality.png").name
        figures["eps_scan"] = plots.plot_eps_scale_scan(scan, out / "eps_scale_scan.png").name
    if tables["terciles"]:
        shown = [s for s in (*parts["leak"], *parts["fixes"][1:]) if s.key in evaluator.images]
        luminance = {"data": metrics.image_brightness(evaluator.data)["luminance"]}
        luminance.update({f"{s.model}, {s.start}": metrics.image_brightness(evaluator.images[s.key])["luminance"]
                          for s in shown})
        figures["summary"] = plots.plot_study_summary(tables["terciles"], luminance, out / "summary.png").name
    (out / "grids").mkdir(exist_ok=True)
    for setting in dict.fromkeys(s for part in parts.values() for s in part):
        if setting.key in evaluator.images:
            path = out / "grids" / f"{setting.key}.png"
            save_image_grid(to_float(evaluator.images[setting.key][:64]), path, nrow=16,
                            scale=grid_scale(evaluator.config))
            results.grids[setting.label] = f"grids/{path.name}"

"""The study's report: report.html (both studies) and the plain-text and markdown tables (report.md), from the typed
results (`load_results` reads them back from any results.json). Everything lands in `<out>/report.html` (plots,
sample grids, the results tables with settings, seeds and run times); no number in the report is written by hand."""
import math
from pathlib import Path

from ldm_lite import html_page, metrics
from ldm_lite.study.plan import KID_STD_AT_500, detectable_kid_difference
from ldm_lite.study.findings import band_findings, leak_findings, offset_findings, quality_findings
from ldm_lite.study.results import DemoResults, QualityResults


def _paragraph(sentences: list) -> str:
    return "<p>" + " ".join(html_page.escape(s) for s in sentences) + "</p>" if sentences else ""


def format_results(results: DemoResults | QualityResults) -> str:
    """The study's result tables, and the findings computed from them, as plain text."""
    if isinstance(results, QualityResults):
        return format_quality_results(results)
    tables = results.tables
    parts = ["Offset noise: class-conditional samples, mean brightness (data in [-1, 1])",
             metrics.format_table(tables["offset_noise"],
                                  ["model", "asked", "data_mean", "samples_mean", "gap", "steps", "n"]),
             *offset_findings(tables["offset_noise"]),
             "", "Signal leak: unconditional samples vs data, per-image luminance",
             metrics.format_table(tables["signal_leak"],
                                  ["model", "initial_noise", "t0", "std_ratio", "wasserstein", "ks", "n"]),
             *leak_findings(tables["signal_leak"])]
    if results.skipped:
        parts += ["", results.skipped]
    return "\n".join(parts)


def write_report(results: DemoResults | QualityResults, path: Path) -> None:
    """A self-contained HTML page (images referenced next to it) with every section of the demo or the study."""
    if isinstance(results, QualityResults):
        html_page.write_page(path, "ldm_lite bias and quality study", html_page.sections(_quality_sections(results)))
    else:
        html_page.write_page(path, "ldm_lite bias study", html_page.sections(_demo_sections(results)))


def _demo_sections(results: DemoResults) -> list:
    config = results.config
    sections = [
        ("Summary", "<p>Left: mean brightness of class-conditional samples per asked class (part 2). Right: "
         "spread of the per-image brightness of unconditional samples against the data (part 3).</p>" +
         _plot(results.figures["summary"])),
        ("Settings", html_page.table([{"setting": k, "value": v} for k, v in config.items()]) +
         html_page.table([{"part": k, "seconds": round(v, 1)} for k, v in results.timings.items()]) +
         f"<p>Total run time: {results.total_seconds / 60:.1f} minutes.</p>"),
        ("1. How the forward process destroys each DCT band",
         "<p>SNR per octave band of the data, SNR_b(t) = alpha_bar_t P_b / (1 - alpha_bar_t); a band is destroyed "
         "once its SNR falls below 1. Measured correlation of x0 and x_t per band vs the theory sqrt(S / (1 + S)); "
         f"largest deviation {results.band_correlation_max_error:.3f}.</p>" +
         _paragraph(band_findings(results.tables["destruction"], results.tables["band_leak"])) +
         "".join(_plot(p) for p in results.figures["bands"].values()) +
         "<h3>Destruction timestep per band (all channels)</h3>" + html_page.table(results.tables["destruction"]) +
         "<h3>SNR left at the first sampled step</h3>" + html_page.table(results.tables["band_leak"])),
        ("2. Offset noise: asked for dark or bright",
         "<p>Class-conditional samples per brightness class, mean brightness vs the data's class mean "
         "(gap = samples - data; near-zero gaps for dark and bright mean the model reaches the extremes).</p>" +
         html_page.table(results.tables["offset_noise"]) +
         _paragraph(offset_findings(results.tables["offset_noise"])) +
         "".join(_grid(p, k) for k, p in results.grids.items() if "rows" in k)),
        ("3. Signal leak: unconditional brightness",
         "<p>Per-image luminance of unconditional samples vs the data: std ratio below 1 means squeezed toward "
         "mid-grey; W1 and KS compare the distributions.</p>" + html_page.table(results.tables["signal_leak"]) +
         _paragraph(leak_findings(results.tables["signal_leak"])) +
         "".join(_plot(p, k) for k, p in results.figures.items() if k.startswith("brightness")) +
         "".join(_grid(p, k) for k, p in results.grids.items() if "unconditional" in k)),
    ]
    if results.skipped:
        sections.append(("4. Zero terminal SNR", f"<p>{html_page.escape(results.skipped)}</p>"))
    return sections


COLUMNS_NOTE = ("<p>Columns: <b>kid</b>, KID mean over 100 random subsets of n // 2 images per side (Binkowski et "
                "al.), <b>kid_std</b> its standard deviation over the subsets; <b>fid</b> against the same reference; "
                "<b>kid_diff</b> KID minus the baseline's and <b>beyond_2sd</b> whether |kid_diff| exceeds 2 "
                "sqrt(kid_std<sup>2</sup> + kid_std<sub>baseline</sub><sup>2</sup>); <b>w1</b>, <b>ks</b>, "
                "<b>std_ratio</b>: per-image luminance of the samples against the reference images (W1 with its "
                "bootstrap standard deviation <b>w1_sd</b>; std ratio below 1 = squeezed toward mid-grey); "
                "<b>mean</b>: mean brightness in [-1, 1]; <b>hf_log10</b>: log10 samples / data power in the finest "
                "complete DCT octave (below 0: blurred); <b>seconds</b>: sampling, features and metrics.</p>")


def _quality_sections(results: QualityResults) -> list:
    """The study's report: the findings first, then one section per evaluation, the plan and the settings."""
    tables, figures, config = results.tables, results.figures, results.config
    findings = quality_findings(tables)
    base = (f"the standard model, DDIM with {config['sample_steps']} steps from plain noise, unconditional (the null "
            "label), with the run's x0 clipping (clip_sample, on for pixel models)")
    return [
        ("Summary", f"<p>{_models_sentence(results)} {html_page.escape(config['data'])} at {config['resolution']} "
         f"px; every setting draws {results.samples} "
         f"samples from the same seeds, compared with {results.reference['images']} training images. Parts 2-4 "
         f"share one base setting: DDIM at {config['sample_steps']} steps with the run's clip_sample (on for pixel "
         "models), from plain noise, lambda 1.</p>"
         + _list([s for part in findings.values() for s in part]) + _figure(figures, "summary")),
        ("1. Samplers against the number of model calls",
         "<p>The standard model, unconditional samples from the same x_T per sampler; Heun takes 2N - 1 calls "
         "for N steps. Every sampler runs without x0 clipping (x0_clipping: off), so that clipping, which only "
         "DDIM and Heun offer, does not decide the comparison; \"ddim (x0 clipped)\" is the base setting of parts "
         "2-4, DDIM with the run's clipping, and \"ddim (quadratic spacing)\" DDIM at the DDIM paper's quadratic "
         "timesteps (t0 = 0.8 T, up to 29 steps at T = 1000). t0: the first timestep. Baseline of kid_diff: "
         "unclipped DDIM at the same NFE.</p>" + COLUMNS_NOTE
         + _figure(figures, "fid_nfe") + html_page.table(with_floor(tables["samplers"], tables))
         + _paragraph(findings["samplers"])),
        ("2. Epsilon scaling: the lambda FID picks and the one the exposure metric picks",
         f"<p>{base}, with eps / lambda in every x0 estimate (Ning et al.), lambda on both sides of 1; rows with "
         "eps_slope use lambda_t = k t + b over the step index t (N - 1 at the noisiest step), centred on their "
         "eps_scale. eps_norm_gap: RMS relative gap between the eps-norm along sampling (from noised training images) "
         "and on forward-noised training images (scanned for the constant lambdas). A pick at the grid's edge is "
         "not called agreement: its optimum may lie beyond the grid.</p>"
         + html_page.table(with_floor(tables["eps"], tables)) + _paragraph(findings["eps"])
         + _figure(figures, "eps_quality")
         + _figure(figures, "eps_scan")),
        ("3. Signal leak and DC steering",
         f"<p>{base}, from plain x_T and from leak-aware x_T (dct+pixel statistics of the training images, "
         "Everaert et al.); the same for the leaky model (Stable Diffusion's scaled_linear schedule) when it "
         "trained, the standard model being the control. Steering fixes the leak's DC to a tercile's mean "
         "brightness; its share of the way is measured against the same seeds' leak-aware samples, unsteered. "
         "Steered samples are meant to differ from the data, so they get brightness figures, not FID.</p>"
         + "".join(html_page.table(rows) for rows, _ in _schedules(tables))
         + html_page.table(with_floor(tables["leak"], tables))
         + html_page.table(tables["steering"]) + _paragraph(findings["leak"])),
        ("4. The fixes against the standard recipe",
         f"<p>Each model unconditionally with DDIM, {config['sample_steps']} steps (the zero-SNR model with trailing "
         "spacing, the offset model from its own training noise, randn + s randn(C, 1, 1)); then asked for each "
         "brightness tercile. The leaky model is the standard recipe on Stable Diffusion's schedule: against the "
         "standard model it shows what that schedule costs, the offset and zero-SNR models what they buy.</p>"
         + html_page.table(with_floor(tables["fixes"], tables)) + html_page.table(tables["terciles"])
         + _paragraph(findings["fixes"])),
        ("Plan, budget and timings", _plan_section(results)),
        ("Sample grids", "".join(_grid(path, label) for label, path in results.grids.items())),
        ("Settings", html_page.table([{"setting": k, "value": v} for k, v in config.items()])
         + html_page.table(results.models)
         + f"<p>Reference: {html_page.escape(results.reference['source'])}, features cached in "
         f"{html_page.escape(results.reference['path'])}. Seed {config['seed']}: training batches and sample i's noise "
         "(sample_seed(seed, i)), the same for every setting.</p>"),
    ]


def _models_sentence(results: QualityResults) -> str:
    if results.config.get("unet_from"):
        return (f"The model of --unet-from ({html_page.escape(results.config['unet_from'])}) in the standard model's "
                "place, parts 1-3 only (nothing trained), on")
    return f"{len(results.models)} tiny class-conditional UNets, identical but for the fix, trained on"


def _plan_section(results: QualityResults) -> str:
    speed, dropped = results.speed, results.dropped
    autocast = (f"<p>Evaluation sampling runs with bf16 autocast {'on' if speed['autocast'] == 'bf16' else 'off'} "
                f"(--autocast {results.config['autocast']}; measured {speed['fp32_calls_per_second']:.0f} model "
                f"calls/s in float32" + (f", {speed['bf16_calls_per_second']:.0f} under bf16"
                                         if "bf16_calls_per_second" in speed else "") + ").</p>")
    estimates = [{"part": k, "planned minutes": v / 60} for k, v in results.estimates.items()]
    timings = [{"part": k, "minutes": v / 60} for k, v in results.timings.items()]
    cut = _list(dropped) if dropped else "<p>Nothing was dropped: every planned evaluation fit the budget.</p>"
    return (html_page.table([speed]) + autocast + "<h3>Plan</h3>" + html_page.table(estimates)
            + f"<p>{html_page.escape(detectable_sentence(results))}</p>" + "<h3>Dropped</h3>"
            + cut + "<h3>Measured time per part</h3>" + html_page.table(timings)
            + f"<p>Total run time: {results.total_seconds / 60:.1f} of {results.config['minutes']:g} minutes."
            "</p>")


def detectable_sentence(results: QualityResults) -> str:
    """The KID difference two settings must show to be told apart at the study's n: the plan's prior and, once the
    base setting ran, from its measured kid_std."""
    n, base = results.samples, next(iter(results.tables.get("fixes") or results.tables.get("leak") or []), None)
    text = (f"At n = {n} samples per setting, two settings' KIDs differ beyond two standard deviations when they "
            f"differ by more than about {detectable_kid_difference(n):.4f} (the plan's prior: kid_std "
            f"{KID_STD_AT_500} at n = 500, scaled as 1 / sqrt(n))")
    if base is not None:
        text += f"; by the base setting's measured kid_std, {2 * math.sqrt(2) * base['kid_std']:.4f}"
    return text + "."


def _figure(figures: dict, name: str) -> str:
    """The figure, or a line saying its evaluations did not run (see the plan's dropped list)."""
    return _plot(figures[name]) if name in figures else f"<p>({name}: not drawn, its evaluations were skipped)</p>"


def _plot(path: str, caption: str = "") -> str:
    return html_page.figure(path, caption, inline=True)


def _grid(path: str, caption: str) -> str:
    """A grid of samples, its pixels kept sharp."""
    return html_page.figure(path, caption, inline=True, pixels=True)


def _list(sentences: list) -> str:
    return "<ul>" + "".join(f"<li>{html_page.escape(s)}</li>" for s in sentences) + "</ul>"


def format_quality_results(results: QualityResults, markdown: bool = False) -> str:
    """The study's tables and findings as plain text, or as markdown (report.md); a column the rows lack (results
    written before it existed, such as x0_clipping) is left out."""
    tables, findings = results.tables, quality_findings(results.tables)
    lead = ["kid", "kid_std", "fid", "kid_diff", "beyond_2sd", "w1", "std_ratio", "hf_log10"]
    floor = [("Real data: the floor", [(tables["floor"], ["source", "n", "kid", "kid_std", "fid", "w1", "std_ratio",
                                                          "hf_log10"])], "floor")] if tables.get("floor") else []
    parts = [*floor, ("1. Samplers against NFE", [(with_floor(tables["samplers"], tables),
                                                   ["sampler", "nfe", "x0_clipping", *lead])], "samplers"),
             ("2. Epsilon scaling", [(with_floor(tables["eps"], tables), ["eps_scale", "eps_slope", *lead,
                                                                          "eps_norm_gap"])], "eps"),
             ("3. Signal leak and DC steering", [*_schedules(tables),
                                                 (with_floor(tables["leak"], tables),
                                                  _present(tables["leak"], ["model", "start", *lead])),
                                                 (tables.get("steering", []), _steering_columns(tables))], "leak"),
             ("4. Fixes", [(with_floor(tables["fixes"], tables), ["model", "start", *lead]),
                           (tables.get("terciles", []), ["model", "asked", "n", "data_mean", "samples_mean", "gap"])],
              "fixes")]
    lines = []
    for title, shown, key in parts:
        lines += [f"### {title}", ""] if markdown else [title]
        for rows, columns in shown:
            columns = [column for column in columns if rows and column in rows[0]]
            lines += [metrics.format_table(rows, columns, markdown=markdown) if rows else "(not evaluated)", ""]
        lines += [f"- {sentence}" if markdown else sentence for sentence in findings[key]] + [""]
    dropped = [f"- {line}" if markdown else line for line in results.dropped]
    return "\n".join(lines + dropped)


SCHEDULE_COLUMNS = ["model", "schedule", "spacing", "steps", "t0", "sqrt_alpha_bar_t0"]


def with_floor(rows: list, tables: dict) -> list:
    """A quality table as shown: led by the real-data floor (tables["floor"]), its first column saying "real data",
    the columns it has no value for empty; the rows as they are when there is no floor (older results)."""
    if not rows or not tables.get("floor"):
        return rows
    floor = tables["floor"][0]
    first = {name: floor.get(name, "") for name in rows[0]}
    first.update({next(iter(rows[0])): "real data", "kid_diff": "", "beyond_2sd": "floor"})
    return [first, *rows]


def _schedules(tables: dict) -> list:
    """[(the schedules table, its columns)], or [] for results.json written before it."""
    return [(tables["schedules"], SCHEDULE_COLUMNS)] if tables.get("schedules") else []


def _present(rows: list, columns: list) -> list:
    """The `columns` the rows hold (a results.json written before a column existed lacks it)."""
    return [c for c in columns if any(c in row for row in rows)] if rows else columns


def _steering_columns(tables: dict) -> list:
    """The steering table's columns: paired rows (model, unsteered_mean), or the plain_mean of older results."""
    if any("unsteered_mean" in row for row in tables.get("steering", [])):
        return ["model", "steered_to", "t0", "sqrt_alpha_bar_t0", "n", "target_mean", "unsteered_mean",
                "samples_mean", "share"]
    return ["steered_to", "t0", "sqrt_alpha_bar_t0", "n", "target_mean", "plain_mean", "samples_mean", "share"]

"""The real-image study's settings and plan as pure logic: which steps each sampler gets at an NFE target, the
settings a resumed study keeps or refuses, the plan's cuts against hand-computed costs (fabricated speeds), the
run-time skips, the clock, and the offset model's training noise."""
import dataclasses
import math

import pytest
import torch

from ldm_lite import metrics
from ldm_lite.sampling import initial_noise, sample_generators
from ldm_lite.schedulers import from_config
from ldm_lite import study as study_module
from ldm_lite.study import shards
from ldm_lite.study import (Plan, QualityResults, QualityStudyConfig, check_study_settings, evaluation_seconds,
                            first_choices, offset_training_noise, plan_study, quality_tables, record_choices,
                            run_evaluations, run_order, sampler_steps, saved_extra, study_parts)
from study_quick_settings import QUICK, table_row

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_unsplit_scan_is_planned_at_one_process_rate():
    config = QualityStudyConfig(out="unused", data="synthetic", exposure_images=10, samples_per_class=10)
    calls = study_module.extra_calls(config)  # 20 steps x 10 images x (1 + 7 lambdas); 20 x 10 x 3 x 4 models;
    # steering: 20 steps x 10 images x 2 targets x 2 models (standard and leaky)
    assert calls == {"terciles": 2400, "steering": 800, "scan": 1600}
    seconds = study_module.extra_seconds(config, {"calls_per_second": 200.0, "processes": 2})
    assert seconds == {"terciles": 12.0, "steering": 4.0, "scan": 16.0}


def test_a_share_gets_its_rows_of_per_sample_keywords():
    rows = range(2, 4)
    images = torch.arange(5 * 3 * 2 * 2).reshape(5, 3, 2, 2)
    assert torch.equal(shards._rows(images, rows), images[2:4])
    assert torch.equal(shards._rows([0, 1, 2, 1, 0], rows), torch.tensor([2, 1]))
    assert shards._rows(3, rows) == 3
    leak = images[0]
    assert shards._rows(leak, rows) is leak  # one (C, H, W) leak for every sample
    assert torch.equal(shards._rows(torch.tensor(7), rows), torch.tensor(7))


def test_study_settings_refused_unless_fresh(tmp_path):
    config = QualityStudyConfig(out=str(tmp_path), **QUICK)
    check_study_settings(config, tmp_path)
    check_study_settings(QualityStudyConfig(out=str(tmp_path), **{**QUICK, "minutes": 5}), tmp_path)  # budget only
    changed = QualityStudyConfig(out=str(tmp_path), **{**QUICK, "nfes": "5,10", "seed": 1})
    with pytest.raises(ValueError, match=r"other settings \(nfes, seed\)"):
        check_study_settings(changed, tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "trained.json").write_text("{}")
    check_study_settings(QualityStudyConfig(out=str(tmp_path), **{**QUICK, "nfes": "5,10", "seed": 1, "fresh": True}),
                         tmp_path)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "trained.json").exists()
    check_study_settings(changed, tmp_path)  # the fresh study's settings are now the recorded ones


def test_heun_gets_the_nearest_nfe_not_above():
    assert [sampler_steps("heun", nfe) for nfe in (10, 20, 50, 1)] == [(5, 9), (10, 19), (25, 49), (1, 1)]
    assert [sampler_steps(name, 20) for name in ("ddim", "dpmpp_2m", "unipc", "euler")] == [(20, 20)] * 4


def test_pndm_gets_its_model_calls_from_diffusers_timesteps():
    """PLMS calls the model once more than its steps (the warm-up's t_1 twice); diffusers' PNDMScheduler (the
    same timesteps list, skip_prk_steps as Stable Diffusion) says how many."""
    PNDMScheduler = pytest.importorskip("diffusers").PNDMScheduler
    for skip_prk_steps, name, steps in ((True, "pndm", 19), (False, "PNDMScheduler", 11)):
        reference = PNDMScheduler(skip_prk_steps=skip_prk_steps)
        reference.set_timesteps(steps)
        assert sampler_steps(name, 20) == (steps, len(reference.timesteps))
        reference.set_timesteps(steps + 1)
        assert len(reference.timesteps) > 20
    with pytest.raises(ValueError, match="PNDMScheduler cannot sample in 12 model calls or fewer"):
        sampler_steps("PNDMScheduler", 12)


def test_nfe_targets_that_give_the_same_steps_are_one_setting():
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="heun,ddim", nfes="9,10")
    settings = study_parts(config)["samplers"]
    assert [(s.sampler, s.steps, s.nfe, s.level, s.clip_sample, s.spacing) for s in settings] == [
        ("heun", 5, 9, 9, False, None), ("ddim", 9, 9, 9, False, None), ("ddim", 9, 9, 9, False, "quadratic"),
        ("ddim", 10, 10, 10, False, None), ("ddim", 10, 10, 10, False, "quadratic"),
        ("ddim", 20, 20, 20, None, None)]  # the base setting (the run's x0 clipping) is part 1's clipped DDIM


def test_quadratic_ddim_joins_part_1_up_to_its_most_steps():
    """At T = 1000 quadratic spacing has at most 29 steps: no quadratic row at NFE 50, and none when turned off."""
    parts = study_parts(QualityStudyConfig(out="unused", data="synthetic"))
    assert sorted(s.level for s in parts["samplers"] if s.spacing == "quadratic") == [10, 20]
    parts = study_parts(QualityStudyConfig(out="unused", data="synthetic", quadratic_ddim=False))
    assert not any(s.spacing for s in parts["samplers"])
    assert all(s.clip_sample is False for s in parts["samplers"] if s != parts["leak"][0])  # but the base


def test_samplers_without_ddim_have_no_baseline():
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="unipc,euler", nfes="10")
    parts = study_parts(config)
    rows = {s.key: {**table_row(0.04), **dataclasses.asdict(s), **{c: 0.0 for c in study_module.BIAS_COLUMNS},
                    "x0_clipping": "clip_sample" if s.clip_sample is None else "off", "t0": 951.0}
            for s in parts["samplers"] + parts["fixes"][:1]}
    table = quality_tables(parts, rows, None, [], [])["samplers"]
    assert [(r["sampler"], r["beyond_2sd"]) for r in table] == [
        ("unipc", "no baseline"), ("euler", "no baseline"), ("ddim (quadratic spacing)", "no baseline"),
        ("ddim (x0 clipped)", "no baseline")]  # only unclipped DDIM at the same NFE is the baseline
    assert all(math.isnan(r["kid_diff"]) for r in table)


def test_a_resumed_study_keeps_its_first_sample_count_and_autocast(tmp_path):
    speed = {"autocast": "bf16", "fp32_calls_per_second": 100.0, "bf16_calls_per_second": 150.0,
             "calls_per_second": 150.0, "processes": 2}
    record_choices(tmp_path, Plan([], 250, {}, [], reference=2000), speed)
    assert first_choices(tmp_path, dict(speed)) is None  # nothing evaluated yet: this run chooses
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.safetensors").write_bytes(b"")
    resumed_speed = {**speed, "autocast": "off", "calls_per_second": 200.0}  # the bf16 gain re-measured lower
    assert first_choices(tmp_path, resumed_speed) == (250, 2000)
    assert resumed_speed["autocast"] == "bf16" and resumed_speed["calls_per_second"] == 300.0


def test_a_kept_sample_count_is_never_cut_and_plans_the_nfe_levels():
    """With the first run's 250 samples kept, the plan drops NFE levels by their cost at 250 and stops there."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=150, exposure_images=10, samples_per_class=10)
    parts = study_parts(config)
    speed = {"calls_per_second": 100.0, "inception_per_second": 10.0}
    order = run_order(parts)
    without_50 = [s for s in order if s.level != 50]
    margin = 0.03 * 60 * 150 + 60
    between = (evaluation_seconds(config, without_50, 250, speed) + evaluation_seconds(config, order, 250, speed)) / 2
    plan = plan_study(config, parts, speed, lambda count: True, False, between + margin, samples=250, reference=10)
    assert plan.samples == 250 and plan.settings == without_50
    assert plan.dropped[0] == "Samples per setting kept at 250, the count of the study's first evaluations."
    assert plan.dropped[1].startswith("Part 1 at NFE 50 (5 settings) dropped")
    tight = plan_study(config, parts, speed, lambda count: False, False, margin + 1.0, samples=250, reference=10)
    assert tight.samples == 250 and tight.dropped[-1].startswith("Nothing left to cut")


def test_extras_are_saved_and_read_back(tmp_path):
    """An extra computed once is read back (rows with NaN, its grids, the scan's curves as tensors) by a run with
    the same models and autocast, and computed again when a model's steps differ."""
    from types import SimpleNamespace
    evaluator = SimpleNamespace(out=tmp_path, autocast_dtype=None)
    models = {"standard": {"steps": 10}}
    calls = []

    def terciles():
        calls.append(1)
        (tmp_path / "grid.png").write_bytes(b"png")
        results["grids"]["a grid"] = "grid.png"
        return [{"share": math.nan, "asked": "dark"}]
    results = {"grids": {"earlier": "earlier.png"}}
    first = saved_extra("terciles", terciles, models, evaluator, results["grids"])
    results = {"grids": {}}
    again = saved_extra("terciles", terciles, models, evaluator, results["grids"])
    assert len(calls) == 1 and results["grids"] == {"a grid": "grid.png"}
    assert again[0]["asked"] == "dark" and math.isnan(again[0]["share"]) and math.isnan(first[0]["share"])
    saved_extra("terciles", terciles, {"standard": {"steps": 11}}, evaluator, {})
    assert len(calls) == 2
    curve = {"timesteps": torch.tensor([981, 1]), "eps_norm": torch.tensor([1.0, 0.5])}
    scan = {"candidates": [1.0, 1.01], "gap": [0.2, 0.1], "best": 1.01, "forward": curve,
            "traces": [{**curve, "samples": torch.zeros(2)}, curve]}
    saved_extra("scan", lambda: scan, models, evaluator, {})
    read = saved_extra("scan", lambda: pytest.fail("recomputed"), models, evaluator, {})
    assert read["candidates"] == [1.0, 1.01] and read["best"] == 1.01
    assert torch.equal(read["traces"][1]["eps_norm"], curve["eps_norm"])
    assert torch.equal(read["forward"]["timesteps"], curve["timesteps"])


def test_markdown_tables():
    rows = [{"a": 1, "b": 0.123456}, {"a": 2, "b": 1.5}]
    assert metrics.format_table(rows, markdown=True) == "| a | b |\n| --- | --- |\n| 1 | 0.1235 |\n| 2 | 1.5 |"


def test_plan_cuts_settings_of_lower_importance_before_samples():
    """Costs by hand: per setting n NFE / calls_per_second + n / inception_per_second + 15 s, the real-data floor
    n / inception_per_second + 15 s, the extras' model calls, and uncached reference images at the Inception rate.
    With the budget set just above the last cut, the plan drops NFE 50, halves the uncached reference twice (down
    to 1000), drops part 1's other settings, then part 2 and its scan, and only then halves the samples."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=150, exposure_images=10, samples_per_class=10,
                                fixes="offset,ip,zero_snr", reference_images=4000)
    speed = {"calls_per_second": 100.0, "inception_per_second": 10.0}
    parts = study_parts(config)
    settings = list(dict.fromkeys(s for part in parts.values() for s in part))
    nfes = sorted(s.nfe for s in settings)
    # 5 unclipped samplers x 3 levels (Heun 9, 19, 49) + quadratic DDIM at 10 and 20 + the base (clipped DDIM 20)
    # + eps 0.99..1.03 but 1 (6) and one slope + leak (1) + 3 fixes = 29 settings
    assert len(settings) == 29 and sum(nfes) == 4 * (10 + 20 + 50) + 9 + 19 + 49 + 10 + 20 + 12 * 20
    terciles_steering, scan = 20 * 10 * (3 * 4 + 2), 20 * 10 * (1 + 7)  # scan: the 7 constant lambdas

    def cost(n, total_nfe, count, with_scan=True):  # the settings, the floor and the extras
        return (n * total_nfe + terciles_steering + with_scan * scan) / 100 + (count + 1) * (n / 10 + 15)
    assert evaluation_seconds(config, settings, 500, speed) == pytest.approx(cost(500, sum(nfes), 29))
    # left: 5 settings, without part 1 (NFE 20: 4 x 20 + 19 + quadratic 20; NFE 10: 4 x 10 + 9 + quadratic 10; the
    # base, clipped DDIM 20, stays) and part 2 (7 x 20)
    rest = sum(nfes) - (4 * 50 + 49) - (4 * 20 + 19 + 20) - (4 * 10 + 9 + 10) - 7 * 20
    margin, training = 0.03 * 9000 + 60, 0.55 * 9000
    left = 1000 / 10 + training + margin + cost(250, rest, 5, with_scan=False) + 1
    plan = plan_study(config, parts, speed, lambda count: False, train_needed=True, seconds_left=left)
    assert plan.samples == 250 and plan.reference == 1000 and len(plan.settings) == 5
    assert plan.extras == ("terciles", "steering") and plan.estimates["reference features"] == 100.0
    assert [line.split(":")[0] for line in plan.dropped] == [
        "Part 1 at NFE 50 (5 settings) dropped", "Reference images cut from 4000 to 2000 (their features are not "
        "cached)", "Reference images cut from 2000 to 1000 (their features are not cached)",
        "Part 1 dropped (12 settings; the base setting stays)", "Part 2 dropped (7 settings and its scan; the base "
        "setting stays)", "Samples per setting cut from 500 to 250"]
    assert plan.dropped[0].split(": ")[1].startswith(f"the evaluations were estimated at "
                                                     f"{cost(500, sum(nfes), 29) / 60:.1f} min")
    cached = plan_study(config, parts, speed, lambda count: count == 4000, False, cost(500, sum(nfes), 29) + margin + 1)
    assert cached.dropped == [] and (cached.samples, cached.reference) == (500, 4000) and len(cached.settings) == 29
    assert cached.estimates["reference features"] == 0.0
    starved = plan_study(config, parts, speed, lambda count: True, True, 60.0)
    assert starved.samples == 250 and starved.dropped[-1].startswith("Nothing left to cut")


def test_twenty_minutes_on_an_empty_cache_fit_their_budget():
    """--minutes 20, default settings, nothing cached, Inception at 14 images/s (two quiet cores): 10,000 reference
    images alone would take 11.9 min, so the plan cuts them until training keeps its 55% and what always runs
    (the base setting, the floor, the report) fits beside the reference and the margin."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=20)
    speed = {"calls_per_second": 150.0, "inception_per_second": 14.0}
    seconds_left = 20 * 60 - 60  # after loading the data and the network and measuring the speed
    plan = plan_study(config, study_parts(config), speed, lambda count: False, True, seconds_left)
    estimates = plan.estimates
    assert plan.reference == 1250 and estimates["reference features"] == pytest.approx(1250 / 14)
    assert plan.dropped[1].startswith("Reference images cut from 10000 to 5000 (their features are not cached)")
    # the base setting at n: n x 20 calls at 150/s, then n / 14 s of features and 15 s of FID; the floor the same
    # without the calls; a minute for the report
    n = plan.samples
    assert estimates["evaluations (least)"] == pytest.approx(n * 20 / 150 + 2 * (n / 14 + 15) + 60)
    assert estimates["training (least)"] == 0.55 * 1200 and estimates["margin"] == 0.03 * 1200 + 60
    assert (estimates["reference features"] + estimates["training (least)"] + estimates["evaluations (least)"]
            + estimates["margin"]) <= seconds_left
    # a budget too small for the training share: training gets what the reference, the least and the margin leave
    small = plan_study(config, study_parts(config), speed, lambda count: True, True, 700.0)
    least = small.estimates["evaluations (least)"]
    assert small.estimates["training (least)"] == pytest.approx(700.0 - least - small.estimates["margin"])
    # the KID difference detectable at n: 2 sqrt(2) kid_std, kid_std 0.003 at n = 500 scaled as 1 / sqrt(n)
    assert study_module.detectable_kid_difference(125) == pytest.approx(2 * math.sqrt(2) * 0.003 * 2)


def test_run_time_skips_follow_the_rates_the_settings_ran_at():
    """Planned at 1000 model calls/s, the base setting samples at 2 (10 images x 20 calls in 100 s): with 150 s
    left, every later setting (100 s) and extra (terciles 600 calls, steering 200, scan 400: 300, 100 and 200 s)
    plus a minute for the report no longer fits, and each is skipped in order of importance."""
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="ddim", nfes="20", eps_scales="1.0",
                                eps_slopes="", quadratic_ddim=False, fixes="offset", exposure_images=10,
                                samples_per_class=5, unconditional_samples=10)
    parts = study_parts(config)
    plan = Plan(run_order(parts), 10, {"margin": 0.0}, [])

    class Evaluator:
        def evaluate(self, setting, trained):
            return {"sampling_seconds": 100.0, "seconds": 100.0}

    class Clock(study_module.Clock):
        def left(self):
            return 150.0

    evaluator = Evaluator()
    results = QualityResults(config={}, speed={"calls_per_second": 1000.0, "inception_per_second": 1e9})
    evaluator.config = config
    done = run_evaluations(plan, parts, {"standard": None, "offset": None}, None, None, evaluator, Clock(60),
                           results)
    assert list(done["rows"]) == ["standard_ddim_20_eps_1_plain_noise"] and done["scan"] is None
    assert results.speed["observed_calls_per_second"] == 2
    assert results.dropped == [
        f"{label} skipped at run time: 2.5 min of the budget were left and it needed about {minutes:.1f} min, plus a "
        "minute for the report." for label, minutes in (
            ("offset, ddim 20 steps (20 calls), own offset noise", 100 / 60), ("tercile samples (part 4)", 5.0),
            ("standard, ddim 20 steps (20 calls), signal leak (dct+pixel)", 100 / 60),
            ("DC steering (part 3)", 100 / 60), ("eps-norm scan (part 2)", 200 / 60),
            ("standard, ddim unclipped 20 steps (20 calls), plain noise", 100 / 60))]


def test_clock_adds_each_timed_block_to_its_part(monkeypatch):
    """`with clock(part):` adds the block's time (monotonic clock readings, stubbed) to the part; a block that
    raises adds nothing; left() is the budget minus the time since the clock started."""
    readings = iter([100.0, 101.0, 103.5, 110.0, 112.0, 120.0, 130.0])
    monkeypatch.setattr(study_module.plan.time, "monotonic", lambda: next(readings))
    clock = study_module.Clock(1.0)  # started at 100
    for _ in range(2):
        with clock("train"):
            pass
    with pytest.raises(RuntimeError), clock("figures"):  # starts at 120, then fails
        raise RuntimeError
    assert clock.parts == {"train": 2.5 + 2.0} and clock.left() == 60.0 - (130.0 - 100.0)


def test_offset_training_noise_is_the_plain_noise_plus_a_per_channel_offset():
    scheduler = from_config({"_class_name": "DDIMScheduler"})
    scheduler.set_timesteps(5)
    x_T = offset_training_noise(scheduler, (3, 4, 4), 6, 0.1, seed=2)
    plain = initial_noise(scheduler, (6, 3, 4, 4), generator=sample_generators(2, 0, 6))
    offset = x_T - plain
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)  # constant per channel
    generator = sample_generators(2, 3, 1)[0]
    torch.randn(1, 3, 4, 4, generator=generator)  # sample 3's plain noise comes first from its generator
    assert torch.allclose(offset[3, :, 0, 0], 0.1 * torch.randn(3, 1, 1, generator=generator).flatten(), atol=1e-6)

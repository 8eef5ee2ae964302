"""What a resumed study reuses: its recorded settings (study.json, refused when they differ), its first run's sample
count and autocast (choices.json), and the extras (tercile samples, DC steering, the eps-norm scan) saved in eval/."""
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ldm_lite.runs import write_text
from ldm_lite.study.config import QualityStudyConfig
from ldm_lite.study.evaluate import Evaluator
from ldm_lite.study.plan import Plan


RESUMABLE_FIELDS = ("out", "minutes", "progress", "fresh", "device", "cache", "eval_batch_size", "compile")


def check_study_settings(config: QualityStudyConfig, out: Path, record: bool = True) -> None:
    """Refuse to continue a study in `out` made with other settings (every field but RESUMABLE_FIELDS) unless
    --fresh, which deletes its records and evaluations first (train() deletes the checkpoints); then record
    this study's settings in study.json. record=False only refuses: the call made before the inputs are
    known good, so a study that fails on them leaves no record to block the corrected command."""
    path = out / "study.json"
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_FIELDS}
    if config.fresh and not record:
        return
    if config.fresh:
        (out / "trained.json").unlink(missing_ok=True)
        (out / "choices.json").unlink(missing_ok=True)
        shutil.rmtree(out / "eval", ignore_errors=True)
    elif path.is_file():
        saved = json.loads(path.read_text())
        differing = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        if differing:
            raise ValueError(f"{str(out)!r} holds a study made with other settings ({', '.join(differing)}); pass "
                             "--fresh to start over (deletes its models and evaluations) or choose another --out")
    if record:
        write_text(path, json.dumps(settings, indent=2))


def first_choices(out: Path, speed: dict) -> tuple | None:
    """(samples per setting, reference images) of the run that made this study's first evaluations (choices.json;
    the reference as configured when it predates the plan's choice), or None when there are none yet; its autocast
    choice replaces the one just measured in `speed`. All three are part of every saved evaluation's key, and all
    settings share one n: a resumed run, with training done, would often plan more samples (or, its reference now
    cached, more reference images), and a re-measured bf16 gain near bf16_choice.MIN_GAIN can flip; any would make every saved
    evaluation stale."""
    path = out / "choices.json"
    evaluated = (out / "eval").is_dir() and any((out / "eval").iterdir())
    if not (evaluated and path.is_file()):
        return None
    saved = json.loads(path.read_text())
    speed["autocast"] = saved["autocast"]
    speed["calls_per_second"] = speed.get("processes", 1) * speed["bf16_calls_per_second" if saved["autocast"] ==
                                                                  "bf16" else "fp32_calls_per_second"]
    return saved["samples"], saved["reference"] if "reference" in saved else config_reference(out)


def config_reference(out: Path) -> int:
    """The --reference-images of the study recorded in out/study.json."""
    return json.loads((out / "study.json").read_text())["reference_images"]


def record_choices(out: Path, plan: Plan, speed: dict) -> None:
    write_text(out / "choices.json", json.dumps({"samples": plan.samples, "reference": plan.reference,
                                                 "autocast": speed["autocast"]}))


def saved_extra(name: str, compute, models: dict, evaluator: Evaluator, grids: dict):
    """An extra's result (rows, or the scan) from eval/<name>.json when an earlier run of this study computed it
    with the same models and autocast (its sample grids are on disk already), else computed and saved there. The
    grids the computation adds to `grids` ({caption: path}) are saved with it and added back when it is read."""
    path = evaluator.out / "eval" / f"{name}.json"
    key = {"models": {model: trained["steps"] for model, trained in models.items()},
           "autocast": str(evaluator.autocast_dtype)}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key and all((evaluator.out / grid).is_file() for grid in saved["grids"].values()):
        grids.update(saved["grids"])
        return _scan_from_json(saved["value"]) if name == "scan" else saved["value"]
    before = set(grids)
    value = compute()
    drawn = {caption: grid for caption, grid in grids.items() if caption not in before}
    record = {"key": key, "grids": drawn, "value": _scan_to_json(value) if name == "scan" else value}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record))  # NaN stays a float (Python's json reads its NaN token back)
    return value


def _scan_to_json(scan: dict) -> dict:
    """What the tables and the scan plot use of `exposure.scan_eps_scale`'s result, as lists."""
    def curve(trace):
        return {"timesteps": trace["timesteps"].tolist(), "eps_norm": trace["eps_norm"].tolist()}
    return {"candidates": list(scan["candidates"]), "gap": [float(g) for g in scan["gap"]], "best": scan["best"],
            "forward": curve(scan["forward"]), "traces": [curve(trace) for trace in scan["traces"]]}


def _scan_from_json(saved: dict) -> dict:
    def curve(trace):
        return {name: torch.tensor(values) for name, values in trace.items()}
    return {**saved, "forward": curve(saved["forward"]), "traces": [curve(trace) for trace in saved["traces"]]}

"""The results of the two studies, typed: `DemoResults` (`python -m analysis demo`) and `QualityResults`
(`python -m analysis study`). The stages put their rows, figures and grids into them; they are written as
results.json (FORMAT_VERSION added) and read back by `load_results`, older files without a version included, so
that `report` renders either.

Figures and grids are paths relative to the output folder; a table is a list of rows (dicts of one kind).
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ldm_lite.runs import write_text

# 1: the first versioned layout; a results.json without "format_version" (written before it, version 0) has the
# same fields, with non-finite floats written as the strings "nan", "inf" and "-inf" as now
FORMAT_VERSION = 1
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass
class DemoResults:
    """The demo's results. tables: "destruction" and "band_leak" (part 1, `metrics.band_tables` rows of all
    channels), "offset_noise" (part 2, one row per model and asked class), "signal_leak" (part 3, one row per model
    and initial noise). figures: "bands" ({name: path}), "brightness: <model>, <initial noise>" and "summary".
    grids: {caption: path}. skipped: why the zero-SNR model (part 4) did not train, or None."""
    config: dict
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    band_correlation_max_error: float = math.nan
    skipped: str | None = None
    timings: dict = field(default_factory=dict)
    total_seconds: float = 0.0

    study: ClassVar[str] = "demo"


@dataclass
class QualityResults:
    """The study's results. speed: the measured rates and the autocast choice (`plan.measure_speed`, plus
    "observed_calls_per_second"); dropped: sentences on what the plan or the clock cut; estimates: planned seconds
    per part; samples: images per evaluated setting; reference: {"path", "images", "source"} of the FID reference;
    models: one row per trained model. tables: "samplers", "eps", "leak", "fixes" (rows of one setting each, led by
    KID), "scan" (eps_scale, eps_norm_gap), "steering" and "terciles". figures: "fid_nfe", "eps_quality",
    "eps_scan", "summary" (those whose evaluations ran). grids: {caption: path}. findings: {part: sentences}."""
    config: dict
    speed: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    estimates: dict = field(default_factory=dict)
    samples: int = 0
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    findings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    total_seconds: float = 0.0

    study: ClassVar[str] = "quality"


def results_to_json(results: DemoResults | QualityResults) -> dict:
    """results.json's content: the fields in order, the study's name first for the study on real images (the demo
    has none, as before versions), the format version, non-finite floats as strings; the demo's `skipped` only
    when set."""
    fields = dataclasses.asdict(results)
    if fields.get("skipped", "") is None:
        del fields["skipped"]
    head = {"study": results.study} if isinstance(results, QualityResults) else {}
    return jsonable({**head, "format_version": FORMAT_VERSION, **fields})


def save_results(results: DemoResults | QualityResults, path: Path) -> None:
    write_text(path, json.dumps(results_to_json(results), indent=2))


def load_results(source) -> DemoResults | QualityResults:
    """The results in a results.json (a path, or its content as a dict) of any format version up to
    FORMAT_VERSION: "study": "quality" marks the study on real images, anything else is the demo; the strings
    "nan", "inf" and "-inf" become floats again."""
    content = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else dict(source)
    version = content.pop("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"results.json format version {version} is newer than this ldm_lite's ({FORMAT_VERSION})")
    kind = QualityResults if content.pop("study", "demo") == "quality" else DemoResults
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{name: _floats(value) for name, value in content.items() if name in names})


def _floats(value):
    """A value read from JSON with the non-finite floats `jsonable` wrote as strings turned back into floats."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def jsonable(value):
    """A value JSON can hold: dicts (string keys, modules dropped), lists, finite floats, ints, strings, booleans
    and None as they are; non-finite floats and anything else as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not isinstance(v, torch.nn.Module)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

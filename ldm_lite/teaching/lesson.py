"""The lesson harness: where lessons and their outputs live, quick mode, and `Lesson`, one lesson's run.

`Lesson` parses `--quick`, owns the output folder runs/lessons/NN/, records figures, findings (sentences chosen
by the numbers) and `check`s (claims tested on what the lesson just ran), and on `finish()` writes results.json
and exits non-zero when a check failed.

Environment: LDM_LITE_LESSON_OUT (output root, default runs/lessons under the repository), LDM_LITE_LESSON_CACHE
(model cache, default <output root>/cache), LDM_LITE_LESSON_QUICK=1 (quick mode without the flag, e.g. in a
notebook). Tests point both folders at a temporary directory, so every run starts from an empty cache.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_lite.data import save_image_grid

OUT_ENV = "LDM_LITE_LESSON_OUT"
CACHE_ENV = "LDM_LITE_LESSON_CACHE"
QUICK_ENV = "LDM_LITE_LESSON_QUICK"
RESULTS_FILE = "results.json"
LESSON_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")


def repo_root() -> Path:
    """The repository holding this package (the folder above ldm_lite/)."""
    return Path(__file__).resolve().parents[2]


def output_root() -> Path:
    """Where lessons write: $LDM_LITE_LESSON_OUT, else <repository>/runs/lessons."""
    return Path(os.environ.get(OUT_ENV) or repo_root() / "runs" / "lessons")


def lessons_folder() -> Path:
    """docs/lessons/ of the repository."""
    return repo_root() / "docs" / "lessons"


def lesson_files(folder=None) -> list[Path]:
    """The lesson scripts NN_name.py in `folder` (default docs/lessons/), sorted by number."""
    folder = Path(folder) if folder is not None else lessons_folder()
    return sorted(p for p in folder.glob("*.py") if LESSON_PATTERN.match(p.name))


@dataclass
class Check:
    """A claim of the lesson, whether what it ran bears it out, and the numbers that decided."""
    claim: str
    passed: bool
    measured: str = ""


@dataclass
class Lesson:
    """The run of lesson `number`: mode, output folder, figures, findings and checks.

    `Lesson(1, "The forward process")` reads `--quick` from sys.argv (unknown arguments, such as a notebook
    kernel's, are ignored) or LDM_LITE_LESSON_QUICK=1, and empties runs/lessons/01/ of earlier figures.
    """
    number: int
    title: str
    argv: list | None = None
    quick: bool = field(init=False)
    out: Path = field(init=False)
    figures: list = field(default_factory=list, init=False)
    findings: list = field(default_factory=list, init=False)
    checks: list = field(default_factory=list, init=False)

    def __post_init__(self):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--quick", action="store_true")
        known, _ = parser.parse_known_args(sys.argv[1:] if self.argv is None else self.argv)
        self.quick = known.quick or os.environ.get(QUICK_ENV, "") not in ("", "0")
        self.out = output_root() / f"{self.number:02d}"
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out.glob("*.png")) + [self.out / RESULTS_FILE]:
            stale.unlink(missing_ok=True)
        self._started = time.monotonic()
        print(f"Lesson {self.number}: {self.title} ({'quick' if self.quick else 'full'} mode) -> {self.out}")

    def path(self, name: str) -> Path:
        """A file in this lesson's output folder."""
        return self.out / name

    def figure(self, fig, name: str, caption: str = "") -> Path:
        """Save a matplotlib figure as NN/name (PNG), close it and list it on the lesson's page."""
        import matplotlib.pyplot as plt
        path = self.path(name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return self.add_figure(path, caption)

    def image_grid(self, images: torch.Tensor, name: str, caption: str = "", nrow: int = 8, scale: int = 4) -> Path:
        """Save images (N, 3, H, W) in [-1, 1] as one PNG grid (`ldm_lite.data.save_image_grid`) and list it."""
        path = self.path(name)
        save_image_grid(images.detach().float().cpu(), path, nrow=nrow, scale=scale)
        return self.add_figure(path, caption)

    def add_figure(self, path, caption: str = "") -> Path:
        """List an image file already in the output folder on the lesson's page."""
        path = Path(path)
        self.figures.append({"file": path.name, "caption": caption})
        print(f"  figure: {path}")
        return path

    def finding(self, sentence: str) -> str:
        """Print and record a sentence of the lesson's findings (build it from the numbers it ran)."""
        self.findings.append(sentence)
        print(f"  finding: {sentence}")
        return sentence

    def check(self, claim: str, passed, measured: str = "") -> bool:
        """Record whether `claim` holds on what the lesson ran; `measured` states the deciding numbers."""
        result = Check(claim, bool(passed), measured)
        self.checks.append(result)
        print(f"  [{'PASS' if result.passed else 'FAIL'}] {claim}" + (f" ({measured})" if measured else ""))
        return result.passed

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def finish(self) -> dict:
        """Write NN/results.json and print the summary; SystemExit(1) when a check failed or none was made."""
        seconds = time.monotonic() - self._started
        results = {"number": self.number, "title": self.title, "mode": "quick" if self.quick else "full",
                   "seconds": round(seconds, 2), "passed": self.passed, "figures": self.figures,
                   "findings": self.findings, "checks": [dataclasses.asdict(c) for c in self.checks]}
        self.path(RESULTS_FILE).write_text(json.dumps(results, indent=2))
        failed = [c for c in self.checks if not c.passed]
        print(f"Lesson {self.number}: {len(self.checks) - len(failed)}/{len(self.checks)} checks passed "
              f"in {seconds:.1f} s")
        if failed or not self.checks:
            raise SystemExit(1)
        return results

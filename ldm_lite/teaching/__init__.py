"""Helpers for the executable lessons in docs/lessons/ (plain Python in the jupytext "percent" cell format).

- `lesson`: the harness. `Lesson` parses `--quick`, owns runs/lessons/NN/, records figures, findings and checks
  and writes results.json; where lessons and outputs live (`output_root`, `lesson_files`, ...).
- `cache`: the lessons' tiny models (`lesson_config`), trained once into a cache keyed by a hash of the resolved
  config (`cached_runs`, `load_cached`, `training_log`), several at once in child processes.
- `markdown` and `page`: the lessons' text (percent cells, Markdown with MathML) and results as
  runs/lessons/index.html.
- `runner` (`python -m ldm_lite.teaching [--quick] [NN ...]`, what `make lessons` calls): runs the lessons one
  after the other, records each one's status and writes the index.

The lessons also use `ldm_lite.data.lesson_images` (real pictures from ../shared/data, else the embedded
synthetic ones) and `ldm_lite.metrics.loss_per_bucket`, exported here too.
"""
from ldm_lite.data import lesson_images, shared_data_dir
from ldm_lite.metrics import loss_per_bucket
from ldm_lite.teaching.cache import (CACHE_RECORD, FULL_STEPS, MODEL_KINDS, CachedRun, cache_root, cached_runs,
                                     config_key, lesson_config, load_cached, training_log)
from ldm_lite.teaching.lesson import (CACHE_ENV, OUT_ENV, QUICK_ENV, RESULTS_FILE, Check, Lesson, lesson_files,
                                      lessons_folder, output_root, repo_root)
from ldm_lite.teaching.markdown import (markdown_parser, markdown_subset_to_html, markdown_to_html, math_to_mathml,
                                        percent_cells)
from ldm_lite.teaching.page import RUN_RECORD, lesson_section, write_index
from ldm_lite.teaching.runner import main, run_lessons

__all__ = ["CACHE_ENV", "CACHE_RECORD", "FULL_STEPS", "MODEL_KINDS", "OUT_ENV", "QUICK_ENV", "RESULTS_FILE",
           "RUN_RECORD", "CachedRun", "Check", "Lesson", "cache_root", "cached_runs", "config_key", "lesson_config",
           "lesson_files", "lesson_images", "lesson_section", "lessons_folder", "load_cached", "loss_per_bucket",
           "main", "markdown_parser", "markdown_subset_to_html", "markdown_to_html", "math_to_mathml",
           "output_root", "percent_cells", "repo_root", "run_lessons", "shared_data_dir", "training_log",
           "write_index"]

"""ldm_lite.teaching: the lessons' helpers (checks and results, the model cache, the loss per timestep bucket,
the percent-format reader, the index page and the runner), each against an independent computation."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from ldm_lite import teaching

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lesson_env(tmp_path, monkeypatch):
    """Output root and model cache in tmp_path, quick mode off."""
    monkeypatch.setenv(teaching.OUT_ENV, str(tmp_path / "out"))
    monkeypatch.setenv(teaching.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(teaching.QUICK_ENV, raising=False)
    return tmp_path


# ----------------------------------------------------------------------------- Lesson


def test_lesson_records_checks_and_exits_non_zero_on_a_failed_one(lesson_env):
    lesson = teaching.Lesson(3, "Sampling", argv=["--quick", "-f", "kernel.json"])
    assert lesson.quick and lesson.out == lesson_env / "out" / "03"
    assert lesson.check("one plus one is two", 1 + 1 == 2, "2")
    assert not lesson.check("pi is three", abs(math.pi - 3) < 1e-3, f"{math.pi:.5f}")
    lesson.finding("a sentence")
    with pytest.raises(SystemExit) as exit_info:
        lesson.finish()
    assert exit_info.value.code == 1
    results = json.loads((lesson.out / teaching.RESULTS_FILE).read_text())
    assert results["passed"] is False and results["mode"] == "quick" and results["findings"] == ["a sentence"]
    assert [c["passed"] for c in results["checks"]] == [True, False]
    assert results["checks"][1] == {"claim": "pi is three", "passed": False, "measured": "3.14159"}


def test_lesson_passes_and_keeps_figures(lesson_env, monkeypatch):
    monkeypatch.setenv(teaching.QUICK_ENV, "1")
    lesson = teaching.Lesson(1, "Forward", argv=[])
    assert lesson.quick
    path = lesson.image_grid(torch.zeros(4, 3, 8, 8), "grid.png", "four grey images", nrow=2, scale=2)
    from PIL import Image
    assert Image.open(path).size == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    lesson.check("true", True)
    results = lesson.finish()
    assert results["passed"] and results["figures"] == [{"file": "grid.png", "caption": "four grey images"}]


def test_lesson_without_checks_fails_and_a_new_run_clears_old_figures(lesson_env):
    lesson = teaching.Lesson(2, "Training", argv=[])
    (lesson.out / "old.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        lesson.finish()
    again = teaching.Lesson(2, "Training", argv=[])
    assert not (again.out / "old.png").exists() and not (again.out / teaching.RESULTS_FILE).exists()


def test_shared_data_is_found_beside_the_repository():
    assert teaching.shared_data_dir() == teaching.repo_root().parent / "shared" / "data"
    assert (teaching.repo_root() / "ldm_lite" / "teaching" / "lesson.py").is_file()


# ----------------------------------------------------------------------------- model cache


def _tiny(**overrides):
    config = teaching.lesson_config("eps", steps=2, batch_size=4, synthetic_size=8, resolution=8, grids=0)
    import dataclasses
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **overrides))


def test_config_key_ignores_the_run_section_but_not_training_settings():
    import dataclasses
    config = _tiny()
    moved = dataclasses.replace(config, run=dataclasses.replace(config.run, out="elsewhere", log_every=7))
    threads = dataclasses.replace(config, train=dataclasses.replace(config.train, num_threads=3))
    assert teaching.config_key(config) == teaching.config_key(moved) == teaching.config_key(threads)
    assert teaching.config_key(config) != teaching.config_key(_tiny(lr=5e-4))
    assert teaching.config_key(config) != teaching.config_key(teaching.lesson_config("v", 2, 4, 8, 8, 0))
    assert len(teaching.config_key(config)) == 16


def test_cached_runs_train_once_and_rebuild_when_the_config_changes(tmp_path):
    first = teaching.cached_runs({"m": _tiny()}, cache=tmp_path)["m"]
    assert first.trained and first.run_dir == tmp_path / f"m-{teaching.config_key(_tiny())}"
    checkpoint = first.run_dir / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    again = teaching.cached_runs({"m": _tiny()}, cache=tmp_path)["m"]
    assert not again.trained and again.run_dir == first.run_dir and checkpoint.stat().st_mtime_ns == stamp
    changed = teaching.cached_runs({"m": _tiny(lr=5e-4)}, cache=tmp_path)["m"]
    assert changed.trained and changed.run_dir != first.run_dir
    loaded = teaching.load_cached(again)
    assert loaded.scheduler_config["prediction_type"] == "epsilon" and loaded.unet.config.sample_size == 8
    assert [row["step"] for row in teaching.training_log(again)][-1] == 2


LESSON_LIKE_SCRIPT = """
import json, os
from pathlib import Path
from ldm_lite import teaching
with open(Path(os.environ["LDM_LITE_LESSON_CACHE"]) / "script_runs.txt", "a") as handle:
    handle.write("ran\\n")  # top-level code, no __main__ guard: it must run once, not once per model
config = teaching.lesson_config("eps", steps=2, batch_size=4, synthetic_size=8, resolution=8, grids=0)
configs = {"a": config, "b": teaching.lesson_config("v", steps=3, batch_size=4, synthetic_size=8, resolution=8,
                                                      grids=0)}
first, again = teaching.cached_runs(configs), teaching.cached_runs(configs)
print(json.dumps({name: [first[name].trained, again[name].trained, teaching.training_log(run)[-1]["step"]]
                  for name, run in again.items()}))
"""


def test_a_lesson_script_run_as_main_trains_its_models_in_processes(tmp_path):
    """Issue 24: run as `python lesson.py`, the cache trained its missing models in a spawn-based pool whose
    children re-ran the script and crashed ("bootstrapping phase", BrokenProcessPool)."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "lesson.py").write_text(LESSON_LIKE_SCRIPT)
    env = {**os.environ, teaching.CACHE_ENV: str(tmp_path / "cache"), "PYTHONPATH": str(teaching.repo_root()),
           "OMP_NUM_THREADS": "1"}  # one thread: far faster than two on a shared machine
    done = subprocess.run([sys.executable, "lesson.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"a": [True, False, 2], "b": [True, False, 3]}
    assert (tmp_path / "cache" / "script_runs.txt").read_text() == "ran\n"
    for name, steps in (("a", 2), ("b", 3)):
        folder = next((tmp_path / "cache").glob(f"{name}-*"))
        assert json.loads((folder / teaching.CACHE_RECORD).read_text())["steps"] == steps


def test_lesson_config_kinds():
    zero = teaching.lesson_config("zero_snr")
    assert zero.diffusion.rescale_betas_zero_snr and zero.diffusion.prediction_type == "v_prediction"
    assert zero.scheduler_config()["timestep_spacing"] == "trailing"
    assert teaching.lesson_config("offset").noise.offset_noise
    assert teaching.lesson_config("x0").diffusion.prediction_type == "sample"
    with pytest.raises(ValueError, match="kind must be one of"):
        teaching.lesson_config("eps2")


# ----------------------------------------------------------------------------- text and index


LESSON_TEXT = textwrap.dedent('''\
    """Docstring."""
    import sys

    # %% [markdown]
    # # 01 A title
    #
    # Text with $x_t = \\sqrt{a} x_0$ and `code` and **bold** <tag>.
    #
    # $$
    # \\mathrm{SNR}(t) = a / (1 - a)
    # $$
    #
    # - item one
    #   continued
    # - item [two](https://arxiv.org/abs/2006.11239)

    # %%
    from ldm_lite.teaching import Lesson
    lesson = Lesson(1, "A title")
    lesson.check("works", "--fail" not in sys.argv, "value 1")
    lesson.finish()
    ''')


def test_percent_cells_split_text_and_code(tmp_path):
    path = tmp_path / "01_title.py"
    path.write_text(LESSON_TEXT)
    cells = teaching.percent_cells(path)
    assert [kind for kind, _ in cells] == ["code", "markdown", "code"]
    assert cells[0][1] == '"""Docstring."""\nimport sys'
    assert cells[1][1].splitlines()[:3] == ["# 01 A title", "", "Text with $x_t = \\sqrt{a} x_0$ and `code` and "
                                            "**bold** <tag>."]
    assert cells[2][1].startswith("from ldm_lite.teaching import Lesson")


def test_markdown_subset_to_html_renders_the_subset():
    text = ("# 01 A title\n\nText $a<b$ and `x<y` and **bold** *it*.\n\n$$\nA < B\n$$\n\n"
            "- one\n  more\n- two\n\n1. first")
    rendered = teaching.markdown_subset_to_html(text)
    assert "<h1>01 A title</h1>" in rendered
    assert "<p>Text $a&lt;b$ and <code>x&lt;y</code> and <strong>bold</strong> <em>it</em>.</p>" in rendered
    assert '<div class="math">$$ A &lt; B $$</div>' in rendered
    assert "<ul><li>one more</li><li>two</li></ul>" in rendered and "<ol><li>first</li></ol>" in rendered
    assert teaching.markdown_subset_to_html("[DDPM](https://arxiv.org/abs/2006.11239)") == \
        '<p><a href="https://arxiv.org/abs/2006.11239">DDPM</a></p>'
    assert teaching.markdown_subset_to_html("$a * b * c$ and 2 * 3") == "<p>$a * b * c$ and 2 * 3</p>"
    assert teaching.markdown_subset_to_html("the **signal left at $t_0$** and `a$b`") == \
        "<p>the <strong>signal left at $t_0$</strong> and <code>a$b</code></p>"


needs_lessons_extra = pytest.mark.skipif(teaching.markdown_parser() is None,
                                         reason="the lessons extra is not installed (pip install -e .[lessons])")


@needs_lessons_extra
def test_markdown_to_html_renders_math_as_mathml():
    rendered = teaching.markdown_to_html("Noise $x_t = \\sqrt{a}\\, x_0$ and <b> *it*.\n\n$$\n\\frac{a}{b}\n$$\n")
    assert rendered.startswith("<p>Noise <span class=\"math inline\"><math xmlns=")
    assert "<msqrt><mrow><mi>a</mi></mrow></msqrt>" in rendered and "&lt;b&gt; <em>it</em>" in rendered
    assert '<div class="math block">\n<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in rendered
    assert "<mfrac><mrow><mi>a</mi></mrow><mrow><mi>b</mi></mrow></mfrac>" in rendered and "$" not in rendered


@needs_lessons_extra
def test_every_formula_of_the_lessons_converts_to_mathml():
    """Each $...$ and $$...$$ of the lessons' text becomes MathML without an error, an <merror> or a LaTeX command
    left as text (latex2mathml writes an unknown command such as \\big\\| verbatim), and no dollar sign is left in
    the rendered text (a formula the parser missed)."""
    parser, formulas, problems = teaching.markdown_parser(), 0, []
    for path in teaching.lesson_files():
        for kind, text in teaching.percent_cells(path):
            if kind != "markdown":
                continue
            tokens = parser.parse(text)
            for token in [child for t in tokens for child in [t, *(t.children or [])]]:
                if token.type.startswith("math"):
                    formulas += 1
                    mathml = teaching.math_to_mathml(token.content, token.type != "math_inline")
                    if "merror" in mathml or "\\" in mathml:
                        problems.append((path.name, token.content))
            outside = re.sub(r'<(span|div) class="math [^"]+">.*?</\\1>|<code>.*?</code>', "", parser.render(text),
                             flags=re.S)
            problems += [(path.name, line) for line in outside.splitlines() if "$" in line]
    assert formulas > 250 and not problems, problems


def test_runner_runs_lessons_and_writes_the_index(tmp_path, monkeypatch):
    folder = tmp_path / "lessons"
    folder.mkdir()
    (folder / "01_pass.py").write_text(LESSON_TEXT)
    (folder / "02_fail.py").write_text(LESSON_TEXT.replace("Lesson(1, ", "Lesson(2, ").replace(
        '"--fail" not in sys.argv', "False").replace("# # 01 A title", "# # 02 Failing"))
    (folder / "03_crash.py").write_text('# %% [markdown]\n# # 03 Crashing\n# %%\nraise RuntimeError("boom")\n')
    (folder / "notes.py").write_text("raise SystemExit(3)\n")  # not a lesson: no NN_ prefix
    out = tmp_path / "out"
    monkeypatch.setenv(teaching.OUT_ENV, str(out))
    assert [p.name for p in teaching.lesson_files(folder)] == ["01_pass.py", "02_fail.py", "03_crash.py"]
    assert teaching.main(["--quick", "--lessons", str(folder)]) == 1
    assert json.loads((out / "01" / teaching.RESULTS_FILE).read_text())["mode"] == "quick"
    index = (out / "index.html").read_text()
    assert index.count("<section") == 3 and "1/1 checks passed" in index
    assert '<span class="fail">failed</span>: 1 of 1 checks failed, first: works (exit 1' in index
    assert '<span class="fail">failed</span>: RuntimeError: boom (exit 1' in index
    assert "<h1>01 A title</h1>" in index and '<td><span class="fail">FAIL</span></td><td>works</td>' in index
    assert "&lt;tag&gt;" in index and "<tag>" not in index
    page = (out / "02.html").read_text()
    assert "<h1>02 Failing</h1>" in page and "01 A title" not in page
    assert teaching.main(["--lessons", str(folder), "1"]) == 0
    assert json.loads((out / "01" / teaching.RESULTS_FILE).read_text())["mode"] == "full"
    assert teaching.main(["--lessons", str(folder), "9"]) == 2


def test_index_marks_lessons_that_did_not_run_and_says_when_math_stays_latex(tmp_path, monkeypatch):
    folder = tmp_path / "lessons"
    folder.mkdir()
    (folder / "01_pass.py").write_text(LESSON_TEXT)
    for module in (teaching.markdown, teaching.page):  # as without the lessons extra
        monkeypatch.setattr(module, "markdown_parser", lambda: None)
    index = teaching.write_index(folder, tmp_path / "out").read_text()
    assert "not run" in index and "<h1>01 A title</h1>" in index
    assert index.index("pip install -e .[lessons]") < index.index("<h1>") and "$x_t = \\sqrt{a} x_0$" in index

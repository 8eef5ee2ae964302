"""The lessons' index page: every lesson's text, findings, figures and checks (from NN/results.json) and, when
the runner ran it, its exit status (NN/run.json), as runs/lessons/index.html and one NN.html per lesson."""
import html
import json
from pathlib import Path

from ldm_lite import html_page
from ldm_lite.teaching.lesson import RESULTS_FILE, lesson_files, output_root
from ldm_lite.teaching.markdown import (LESSONS_EXTRA_NOTICE, markdown_parser, markdown_to_html,
                                       percent_cells)

RUN_RECORD = "run.json"  # written by the runner: exit code, seconds, the reason of a failure

_CSS = """div.math{overflow-x:auto;margin:.8em 0;text-align:center}
.findings{background:#f6f8fa;border-left:4px solid #8ab;padding:.5em 1em}"""


def read_json(path: Path) -> dict | None:
    """The JSON in `path`, or None when it is missing or unreadable (a run still going, or never run)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _status(out_root: Path, number: int) -> str:
    """The lesson's result in one line: checks passed, or failed with the reason the runner recorded."""
    results = read_json(out_root / f"{number:02d}" / RESULTS_FILE)
    run = read_json(out_root / f"{number:02d}" / RUN_RECORD)
    if run is not None and run["returncode"] != 0:
        return (f'<span class="fail">failed</span>: {html.escape(run["reason"])} '
                f'(exit {run["returncode"]}, {run["seconds"]:.0f} s)')
    if results is None:
        return '<span class="fail">not run</span>'
    passed = sum(c["passed"] for c in results["checks"])
    css = "pass" if results["passed"] else "fail"
    return (f'<span class="{css}">{passed}/{len(results["checks"])} checks passed</span> '
            f'({results["mode"]} mode, {results["seconds"]:.0f} s)')


def lesson_section(path: Path, out_root: Path) -> str:
    """HTML of one lesson: its text cells, then its findings, figures and checks from NN/results.json."""
    number = int(path.name[:2])
    results = read_json(out_root / f"{number:02d}" / RESULTS_FILE)
    parts = [f'<section id="lesson-{number:02d}">', f"<p>{_status(out_root, number)} &middot; source "
             f"<code>docs/lessons/{html.escape(path.name)}</code></p>"]
    parts += [markdown_to_html(text) for kind, text in percent_cells(path) if kind == "markdown"]
    if results is not None:
        if results["findings"]:
            parts.append('<h3>Findings of this run</h3><div class="findings">'
                         + "".join(f"<p>{html.escape(s)}</p>" for s in results["findings"]) + "</div>")
        if results["figures"]:
            parts.append("<h3>Figures</h3>")
        parts += [html_page.figure(f"{number:02d}/{f['file']}", f["caption"]) for f in results["figures"]]
        rows = [{"result": html_page.Html(f'<span class="{"pass" if c["passed"] else "fail"}">'
                                          f'{"PASS" if c["passed"] else "FAIL"}</span>'),
                 "claim": c["claim"], "measured": c["measured"]} for c in results["checks"]]
        parts.append("<h3>Checks</h3>" + html_page.table(rows, headers={"result": ""}))
    parts.append("</section>")
    return "\n".join(parts)


def write_index(folder=None, out_root=None) -> Path:
    """Write <out_root>/NN.html for every lesson (text, findings, figures, checks) and <out_root>/index.html: the
    summary table followed by every lesson's section. Returns the index path."""
    files = lesson_files(folder)
    out_root = Path(out_root) if out_root is not None else output_root()
    out_root.mkdir(parents=True, exist_ok=True)
    rows, sections = [], []
    notice = f'<p class="notice">{LESSONS_EXTRA_NOTICE}</p>' if markdown_parser() is None else ""
    for path in files:
        number = int(path.name[:2])
        section = lesson_section(path, out_root)
        title = _lesson_title(path)
        html_page.write_page(out_root / f"{number:02d}.html", title,
                             f'{notice}<p><a href="index.html">All lessons</a></p>\n{section}', heading=False,
                             css=_CSS)
        rows.append({"lesson": html_page.Html(f'<a href="#lesson-{number:02d}">{html.escape(title)}</a> '
                                              f'(<a href="{number:02d}.html">page</a>)'),
                     "result": html_page.Html(_status(out_root, number))})
        sections.append(section)
    body = (notice + "<h1>ldm_lite lessons</h1><p>Executable lessons from <code>docs/lessons/</code>; every number "
            "below was computed by the run that wrote this page (<code>make lessons</code>).</p>"
            + html_page.table(rows) + "\n" + "\n".join(sections))
    index = out_root / "index.html"
    html_page.write_page(index, "ldm_lite lessons", body, heading=False, css=_CSS)
    return index


def _lesson_title(path: Path) -> str:
    """The first markdown heading of a lesson, else its file name."""
    for kind, text in percent_cells(path):
        if kind == "markdown":
            for line in text.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem

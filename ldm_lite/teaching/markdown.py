"""The lessons' text: the cells of a jupytext "percent" script, and their Markdown as HTML.

With the lessons extra (`pip install -e .[lessons]`) markdown-it-py renders CommonMark, and its dollarmath
plugin hands every $inline$ and $$display$$ formula to latex2mathml, so the page shows MathML that browsers
render natively, offline. Without it `markdown_subset_to_html` renders a small subset and keeps the LaTeX source.
"""
import functools
import html
import re
from pathlib import Path

try:  # the lessons extra
    from latex2mathml.converter import convert as latex_to_mathml
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin
except ImportError:
    MarkdownIt = None


def percent_cells(path) -> list[tuple[str, str]]:
    """The cells of a "percent"-format script: [(kind, text)] with kind "markdown" or "code".

    A line starting with `# %%` opens a cell (`# %% [markdown]` a text cell). Text cells lose their leading
    `# ` (or `#`); the text before the first marker is a code cell (the module docstring, imports).
    """
    cells, kind, lines = [], "code", []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# %%"):
            cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        else:
            lines.append(line)
    cells.append((kind, "\n".join(lines).strip("\n")))
    return [(k, text) for k, text in cells if text.strip()]


_INLINE_MATH = re.compile(r"(\$[^$\n]+\$)")


def _inline(text: str) -> str:
    """Escape HTML and render `code`, **bold**, *italic* and [links](url); $...$ math is kept verbatim (escaped),
    also inside bold or italic text."""
    maths = _INLINE_MATH.findall(text)
    parts = _INLINE_MATH.split(text)
    placeholder = "\x00{}\x00"
    text = "".join(placeholder.format(i // 2) if i % 2 else part for i, part in enumerate(parts))
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub("\x00(\\d+)\x00", lambda m: html.escape(maths[int(m.group(1))]), text)


LESSONS_EXTRA_NOTICE = ("Equations are shown as LaTeX source: install the lessons extra "
                        "(<code>pip install -e .[lessons]</code>, which <code>make lessons</code> does) to see them "
                        "rendered.")


def math_to_mathml(latex: str, display: bool) -> str:
    """MathML of a LaTeX formula (latex2mathml), rendered natively by current browsers, no script."""
    return latex_to_mathml(latex, display="block" if display else "inline")


def _math_html(latex: str, options: dict) -> str:
    try:
        return math_to_mathml(latex, options["display_mode"])
    except Exception:  # latex2mathml's errors share no base class; show the source (a test keeps this unused)
        return f'<code class="fail">{html.escape(latex)}</code>'


@functools.cache
def markdown_parser():
    """CommonMark (raw HTML off) with $inline$ and $$display$$ math rendered as MathML; None without the extra."""
    if MarkdownIt is None:
        return None
    return MarkdownIt("commonmark", {"html": False}).use(dollarmath_plugin, double_inline=True, renderer=_math_html)


def markdown_to_html(text: str) -> str:
    """Markdown with math to HTML: markdown-it-py and MathML with the lessons extra, else
    `markdown_subset_to_html` (math kept as LaTeX source)."""
    parser = markdown_parser()
    return parser.render(text) if parser is not None else markdown_subset_to_html(text)


def markdown_subset_to_html(text: str) -> str:
    """A small Markdown subset to HTML: # headings, paragraphs, - and 1. lists, $$ display math $$, inline
    `code`, **bold**, *italic*, [links](url) and $math$ (kept verbatim, escaped)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.strip().startswith("$$"):
            math_lines = [line.strip()]
            while not (math_lines[-1].endswith("$$") and (len(math_lines) > 1 or len(line.strip()) > 2)):
                i += 1
                if i >= len(lines):
                    break
                math_lines.append(lines[i].strip())
            blocks.append(f'<div class="math">{html.escape(" ".join(math_lines))}</div>')
            i += 1
        elif re.match(r"#{1,6} ", line):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif re.match(r"\s*([-*]|\d+\.) ", line):
            ordered = bool(re.match(r"\s*\d+\. ", line))
            items = []
            while i < len(lines) and lines[i].strip():
                if re.match(r"\s*([-*]|\d+\.) ", lines[i]):
                    items.append(re.sub(r"^\s*([-*]|\d+\.) ", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            tag = "ol" if ordered else "ul"
            blocks.append(f"<{tag}>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + f"</{tag}>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("$$") \
                    and not re.match(r"#{1,6} |\s*([-*]|\d+\.) ", lines[i]):
                paragraph.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(blocks)

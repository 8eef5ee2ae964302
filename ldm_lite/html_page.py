"""Self-contained HTML pages (the study's report, the lessons' index): one page shell with its CSS, tables, figures.

Every text is escaped unless it is wrapped in `Html` (a string already written as HTML). Pages load nothing
from the network; images are referenced by relative paths beside the page.
"""
import html
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.5;
color:#222}h1,h2{border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}td.num{text-align:right}
img{max-width:100%}figure{margin:1em 0}figure.inline{display:inline-block;margin:4px}
img.pixels{image-rendering:pixelated}figcaption{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
.pass{color:#176f2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}
.notice{background:#fff8e1;border-left:4px solid #e0b000;padding:.5em 1em}"""


class Html(str):
    """Text that is already HTML: `table` and `page` insert it as it is."""


def escape(value) -> str:
    """HTML of a value: Html as it is, floats to 4 significant digits, anything else as escaped text."""
    if isinstance(value, Html):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def table(rows: list[dict], columns: list | None = None, headers: dict | None = None) -> Html:
    """An HTML table of `rows` (dicts), one column per key of `columns` (default: the first row's keys).

    `headers` renames columns ({key: heading}); numbers are right-aligned; an Html cell is inserted as it is.
    """
    if not rows:
        return Html("<p>(no rows)</p>")
    columns = list(columns or rows[0])
    headers = headers or {}
    head = "".join(f"<th>{escape(headers.get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return Html(f"<table><tr>{head}</tr>{body}</table>")


def _cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td{' class=num' if numeric else ''}>{escape(value)}</td>"


def figure(src, caption: str = "", alt: str = "", inline: bool = False, pixels: bool = False) -> Html:
    """An image `src` (a path relative to the page) with an optional caption; `inline` sets figures side by side,
    `pixels` shows small images with sharp pixels."""
    classes = f" class='inline'" if inline else ""
    image_class = " class='pixels'" if pixels else ""
    caption_html = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return Html(f"<figure{classes}><img src='{escape(str(src))}' alt='{escape(alt or Path(str(src)).name)}'"
                f"{image_class}>{caption_html}</figure>")


def sections(named: list[tuple[str, str]]) -> Html:
    """[(heading, HTML content)] as <h2> sections."""
    return Html("".join(f"<h2>{escape(name)}</h2>{content}" for name, content in named))


def page(title: str, body: str, heading: bool = True, css: str = "") -> str:
    """A complete HTML document: `title`, the shared CSS (plus `css`), an <h1> of the title unless `heading` is
    False, then `body` (HTML)."""
    h1 = f"<h1>{escape(title)}</h1>\n" if heading else ""
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>\n"
            f"<style>{CSS}{css}</style></head><body>\n{h1}{body}\n</body></html>\n")


def write_page(path, title: str, body: str, heading: bool = True, css: str = "") -> Path:
    """Write `page(title, body, heading, css)` to `path`; returns the path."""
    path = Path(path)
    path.write_text(page(title, body, heading, css))
    return path

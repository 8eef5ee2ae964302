"""ldm_lite.html_page: the page shell, tables and figures, read back with Python's own HTML parser."""
from html.parser import HTMLParser

from ldm_lite import html_page


class _Cells(HTMLParser):
    """Rows of a table's cell texts (th and td), and the attributes of every start tag."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.tags, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_table_escapes_text_formats_numbers_and_keeps_html_cells():
    rows = [{"name": "a<b", "fid": 3.14159265, "n": 12, "ok": html_page.Html("<b>yes</b>")},
            {"name": "c & d", "fid": 12345.678, "n": None}]
    parsed = _Cells(html_page.table(rows, headers={"fid": "FID"}))
    assert parsed.rows == [["name", "FID", "n", "ok"], ["a<b", "3.142", "12", "yes"], ["c & d", "1.235e+04", "", ""]]
    right = [attrs for tag, attrs in parsed.tags if tag == "td" and attrs.get("class") == "num"]
    assert len(right) == 3  # 3.142, 12 and 1.235e+04; None and text stay left-aligned
    assert ("b", {}) in parsed.tags
    assert _Cells(html_page.table(rows, columns=["n", "name"])).rows[0] == ["n", "name"]
    assert html_page.table([]) == "<p>(no rows)</p>"


def test_page_is_one_document_with_the_title_and_the_extra_css(tmp_path):
    body = html_page.sections([("Part <1>", html_page.figure("a b/x'.png", "it's a <grid>", pixels=True))])
    path = html_page.write_page(tmp_path / "p.html", "Study & co", body, css=".extra{color:red}")
    text = path.read_text()
    assert text.startswith("<!doctype html>") and text.count("<html>") == 1 and ".extra{color:red}" in text
    parsed = _Cells(text)
    assert [t for t, _ in parsed.tags if t in ("h1", "h2", "figure", "img", "figcaption")] == \
        ["h1", "h2", "figure", "img", "figcaption"]
    image = next(attrs for tag, attrs in parsed.tags if tag == "img")
    assert image == {"src": "a b/x'.png", "alt": "x'.png", "class": "pixels"}
    assert "<title>Study &amp; co</title>" in text and "<h2>Part &lt;1&gt;</h2>" in text
    assert "<h1>" not in html_page.page("t", "<p>x</p>", heading=False) and "http" not in text

"""`make docs-check` finds, in a real browser, what it is there to find.

tests/check_docs_site.py runs on a small site made here, with one page of
every problem it reports (a wide table, a long code line, a page wider than
the window, a missing and a scaled-down image, a broken link and anchor) and
one clean page. Skipped where no Chromium or Chrome is installed (Debian:
`apt-get install chromium`); the unit suite checks the parts that need none.
"""

import importlib.util
import os
import struct
import subprocess
import sys
import zlib

import pytest
from processes import ROOT

SCRIPT = ROOT / "tests" / "check_docs_site.py"
# The browser the script itself would run (it imports no keras).
_spec = importlib.util.spec_from_file_location("check_docs_site", SCRIPT)
check_docs_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs_site)
BROWSER = check_docs_site.find_browser()

pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="needs Chromium or Chrome (CHROMIUM, or chromium / google-chrome on "
    "PATH; Debian: apt-get install chromium)",
)


def png(width, height):
    """A grey PNG of the given size, written without an imaging library."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PAGE = """<!doctype html><html><head><meta charset="utf-8">
<style>body {{ margin: 0; font: 16px monospace; }} main {{ width: 600px; }}</style>
</head><body><main><h1 id="top">A page</h1>{}</main></body></html>"""
BAD = PAGE.format(
    '<h2 id="tables">Tables</h2>'
    '<div style="overflow-x: auto"><table><tr>'
    + "".join(f"<th>column&nbsp;number&nbsp;{i}</th>" for i in range(12))
    + "</tr></table></div>"
    '<h2 id="code">Code</h2>'
    '<pre><code style="display: block; overflow: auto">first = 1\n'
    + "second = "
    + "1 + " * 60
    + "1\n</code></pre>"
    '<div style="width: 2000px">a banner wider than the window</div>'
    '<img src="missing.png"><img src="plot.png" style="width: 100px">'
    '<img src="plot.png">'
    '<a href="clean/">fine</a><a href="clean/#here">fine</a>'
    '<a href="nowhere/">gone</a><a href="clean/#nope">no anchor</a>'
    '<a href="https://example.com/">not fetched</a>'
)
CLEAN = PAGE.format('<p id="here">Nothing wrong here.</p><a href="../">back</a>')


def test_docs_check_finds_every_problem(tmp_path):
    site = tmp_path / "site"
    (site / "clean").mkdir(parents=True)
    (site / "index.html").write_text(BAD)
    (site / "clean" / "index.html").write_text(CLEAN)
    (site / "plot.png").write_bytes(png(400, 50))
    out = tmp_path / "shots"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--site", site, "--out", out, "--jobs", "2"],
        env={**os.environ, "CHROMIUM": BROWSER},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout
    assert done.returncode == 1, report + done.stderr
    clean, bad = report.splitlines()[:2]
    assert clean == "ok      /clean/"
    assert bad == "FAILED  /"
    expected = [
        "overflow: page wider than the 1280 px window by",
        "past its right edge: 'div: a banner wider than the window'\n",
        "overflow: table ",
        "(under #tables): 'column number 0 | column number 1 |",
        "overflow: code ",
        "(under #code): 'first = 1'; longest line (250 chars): 'second = 1 + 1",
        "broken image: 'missing.png' did not load",
        "image downscaled: 'plot.png' shown 100 px wide of its 400 px (25% < 75%)",
        "broken link: <a href='nowhere/'> (no file)",
        "broken link: <a href='clean/#nope'> (no id 'nope' on clean/index.html)",
        "broken link: <img src='missing.png'> (no file)",
        "2 pages, 1 with problems (8 in all); 8 internal links checked, "
        "1 external links not fetched",
    ]
    for text in expected:
        assert text in report, f"{text!r} not in:\n{report}"
    # The full-size image and the links that resolve are no problem.
    assert report.count("plot.png") == 1
    for name in ("index.png", "clean.png"):
        shot = (out / name).read_bytes()
        width, height = struct.unpack(">II", shot[16:24])
        assert shot.startswith(b"\x89PNG") and width == 1280 and height >= 800

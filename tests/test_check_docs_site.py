"""The parts of `make docs-check` (tests/check_docs_site.py) that need no browser.

Which pages it opens, where each link of a page leads, how it finds the
browser, and what its server adds to a page. The browser's own measurements
are checked end to end by integration/test_docs_site.py, where a browser is
installed.
"""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import check_docs_site
import pytest

SCRIPT = Path(check_docs_site.__file__)


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def site(tmp_path):
    """A site laid out as mkdocs lays one out, with directory URLs."""
    root = tmp_path / "site"
    write(
        root / "index.html",
        '<h1 id="top">Home</h1><a href="guides/ids/#caveats">ids</a>'
        '<img src="img/plot.png"><a href="https://example.com/">out</a>',
    )
    write(root / "guides" / "ids" / "index.html", '<h2 id="caveats">Caveats</h2>')
    write(root / "404.html", '<a href="/guides/ids/">ids</a>')
    write(root / "img" / "plot.png")
    write(root / "assets" / "javascripts" / "lunr" / "tinyseg.html")
    write(root / "search" / "search.html")
    return root


def test_pages_leave_out_the_theme_and_search(site):
    assert check_docs_site.find_pages(site) == [
        "404.html",
        "guides/ids/index.html",
        "index.html",
    ]


@pytest.mark.parametrize(
    ("page", "url", "file", "fragment"),
    [
        ("guides/ids/index.html", "../masking/", "guides/masking/index.html", ""),
        ("guides/ids/index.html", "../../", "index.html", ""),
        ("guides/ids/index.html", "#caveats", "guides/ids/index.html", "caveats"),
        ("guides/ids/index.html", "./", "guides/ids/index.html", ""),
        ("index.html", "img/plot.png", "img/plot.png", ""),
        (
            "index.html",
            "reference/#keras_ext_embedding.Embedding",
            "reference/index.html",
            "keras_ext_embedding.Embedding",
        ),
        ("404.html", "/guides/ids/", "guides/ids/index.html", ""),
        ("index.html", "guides/ids", "guides/ids/index.html", ""),
        ("index.html", "a%20b.png", "a b.png", ""),
        ("index.html", "x/#a%20b", "x/index.html", "a b"),
    ],
)
def test_a_link_names_a_file_of_the_site(site, page, url, file, fragment):
    assert check_docs_site.target_file(site, page, url) == (site / file, fragment)


@pytest.mark.parametrize(
    "url",
    [
        "https://keras.io/api/",
        "http://example.com/x.html",
        "//fonts.gstatic.com",
        "mailto:someone@example.com",
        "javascript:void(0)",
        "data:image/png;base64,AAAA",
    ],
)
def test_a_link_off_the_site_names_no_file(site, url):
    assert check_docs_site.target_file(site, "index.html", url) == (None, "")


PUBLISHED = "https://example.github.io/project/"


@pytest.mark.parametrize(
    ("url", "file"),
    [
        # The 404 page's absolute paths, under the published site's path.
        ("/project/guides/ids/", "guides/ids/index.html"),
        ("/project/assets/app.js", "assets/app.js"),
        # A full address of the published site (a canonical link).
        (PUBLISHED + "reference/", "reference/index.html"),
        # A path outside the published one is still this site's.
        ("/other/", "other/index.html"),
    ],
)
def test_links_under_the_published_address_name_this_site(site, url, file):
    found = check_docs_site.target_file(site, "404.html", url, PUBLISHED)
    assert found == (site / file, "")


def test_site_url_is_read_from_mkdocs_yml(tmp_path):
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: x\nsite_url: {PUBLISHED}\ndocs_dir: docs\n")
    assert check_docs_site.site_url(config) == PUBLISHED
    config.write_text("site_name: x\n")
    assert check_docs_site.site_url(config) == ""


def test_links_and_anchors_are_checked(site):
    write(
        site / "guides" / "lora" / "index.html",
        '<a href="../ids/#caveats">found</a>'
        '<a href="../ids/#nowhere">no such id</a>'
        '<a href="../missing/">no such page</a>'
        '<a href="#own">an id of this page</a><a name="own"></a>'
        '<img src="../../img/gone.png">'
        '<a href="https://keras.io/">out</a><a href="mailto:a@b.c">mail</a>',
    )
    page = check_docs_site.Page("guides/lora/index.html")
    check_docs_site.check_links(site, page)
    assert page.problems == [
        "broken link: <a href='../ids/#nowhere'> (no id 'nowhere' on "
        "guides/ids/index.html)",
        "broken link: <a href='../missing/'> (no file)",
        "broken link: <img src='../../img/gone.png'> (no file)",
    ]
    assert (page.internal_links, page.external_links) == (5, 1)


def test_a_clean_page_has_no_problems(site):
    page = check_docs_site.Page("index.html")
    check_docs_site.check_links(site, page)
    assert page.problems == []
    assert (page.internal_links, page.external_links) == (2, 1)


@pytest.mark.parametrize(
    ("path", "url_path", "screenshot"),
    [
        ("index.html", "/", "index.png"),
        ("guides/ids/index.html", "/guides/ids/", "guides-ids.png"),
        ("404.html", "/404.html", "404.png"),
    ],
)
def test_page_names(path, url_path, screenshot):
    assert check_docs_site.Page(path).url_path == url_path
    assert check_docs_site.screenshot_name(path) == screenshot


def executable(path):
    write(path, "#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_browser_is_chromium_or_chrome(tmp_path, monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert check_docs_site.find_browser() is None
    chrome = executable(tmp_path / "google-chrome")
    assert check_docs_site.find_browser() == str(chrome)
    chromium = executable(tmp_path / "chromium")
    assert check_docs_site.find_browser() == str(chromium)
    monkeypatch.setenv("CHROMIUM", str(chrome))
    assert check_docs_site.find_browser() == str(chrome)
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "not-installed"))
    assert check_docs_site.find_browser() is None


def test_no_browser_says_how_to_install_one(tmp_path, site):
    env = {**os.environ, "CHROMIUM": str(tmp_path / "not-installed")}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--site", site, "--out", tmp_path / "shots"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "apt-get install chromium" in done.stderr
    assert not (tmp_path / "shots").exists()


def test_the_server_adds_the_measuring_script_when_asked(site):
    write(site / "lora.html", "<html><body><p>LoRA</p></body></html>")
    server, origin = check_docs_site.serve(site)
    try:
        plain = urllib.request.urlopen(f"{origin}/lora.html").read().decode()
        measured = urllib.request.urlopen(f"{origin}/lora.html?measure").read()
        directory = urllib.request.urlopen(f"{origin}/guides/ids/?measure").read()
    finally:
        server.shutdown()
        server.server_close()
    assert plain == "<html><body><p>LoRA</p></body></html>"
    head, tail = measured.decode().split("<script>const DOCS_CHECK = ", 1)
    assert head == "<html><body><p>LoRA</p>"
    assert tail.endswith("</script></body></html>")
    # The measuring script must not close its own <script> element.
    assert "</script" not in check_docs_site.MEASURE_JS.read_text()
    assert b'id="caveats"' in directory
    assert b"DOCS_CHECK" in directory

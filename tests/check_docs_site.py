"""Opens every page of the built site in headless Chromium and checks it.

    python tests/check_docs_site.py                  # site/, screenshots in site-check/
    python tests/check_docs_site.py --out /tmp/shots --jobs 1

`make docs-check` builds the site (`make docs`), then runs this. Each page of
site/ is served from 127.0.0.1 and opened in a window 1280 px wide, where it
must:

- not overflow sideways: the page no wider than the window, and no code block,
  table or other scrolling box wider than its box (Material wraps a table in a
  scrolling box: the page then fits, but the table's last columns are hidden);
- load every image, and show it at no less than `MIN_IMAGE_SCALE` of its own
  width (a plot scaled down further has labels too small to read);
- link only to files of site/ and to anchors that exist on their page.

A full-page screenshot of each page goes to the output folder, for review.
Prints one line per page, then a summary; exits 1 if any page has a problem.

Chromium is driven through its command line, so the check needs no Python
package: it runs the browser once on the page with check_docs_site.js added,
which measures it (`--dump-dom` returns what the script wrote into the page),
and once for the screenshot, in a window as tall as the page. The browser is
$CHROMIUM, else the first of `BROWSERS` on PATH (Debian: `apt-get install
chromium`; GitHub's ubuntu runners ship google-chrome).
"""

import argparse
import html.parser
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The width the issue asks every page to fit: a laptop's browser window.
VIEWPORT_WIDTH = 1280
# Only the measuring run uses it: widths do not depend on the window's height.
VIEWPORT_HEIGHT = 800
# A plot shown at less than this share of its width in pixels has been scaled
# down so far that its axis labels and legend are too small to read.
MIN_IMAGE_SCALE = 0.75
# Sub-pixel rounding makes a box that fits report a width one pixel over.
OVERFLOW_TOLERANCE_PX = 2
# The benchmarks page is over 40,000 px long. The browser holds the whole
# shot in memory, 4 bytes a pixel (250 MB at this height); a longer page is
# shot down to here, and the report says so.
MAX_SCREENSHOT_HEIGHT = 50_000
# Folders of site/ that hold the theme's and the search's files, not pages.
NOT_PAGES = ("assets", "search")
# Virtual time, not wall time: the browser fast-forwards timers, and waits for
# network requests, so the page's scripts (Material wraps tables from its
# JavaScript) have run well before the page is read.
VIRTUAL_TIME_BUDGET_MS = 5000
# The 47,000 px screenshot of the benchmarks page takes 20 s on 2 cores.
BROWSER_TIMEOUT_S = 120
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Containers give /dev/shm a few MB: the renderer would crash on a long page.
    "--disable-dev-shm-usage",
    # One CSS pixel to one pixel of the screenshot, and no scrollbar taking
    # 15 px of the window in one run and not in the other: both runs lay the
    # page out 1280 px wide.
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
    # Every host but the local server fails at once: the check measures the
    # same page with or without internet (Material's Google Fonts fall back to
    # the system's fonts) and never waits on a request that cannot succeed.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
RESULT_ID = "docs-check-result"
RESULT = re.compile(
    rf'<script type="application/json" id="{RESULT_ID}">(.*?)</script>', re.S
)
# Measures the page in the browser and writes the results into it.
MEASURE_JS = Path(__file__).with_name("check_docs_site.js")


def injected_script():
    """The <script> elements that the server adds to a page to measure it."""
    options = {
        "tolerance": OVERFLOW_TOLERANCE_PX,
        "minScale": MIN_IMAGE_SCALE,
        "resultId": RESULT_ID,
    }
    return (
        f"<script>const DOCS_CHECK = {json.dumps(options)};</script>"
        f"<script>{MEASURE_JS.read_text(encoding='utf-8')}</script>"
    )


@dataclass
class Page:
    """One HTML page of the site and what the check found on it."""

    path: str  # relative to site/, with "/" separators: "guides/ids/index.html"
    problems: list = field(default_factory=list)
    internal_links: int = 0
    external_links: int = 0
    screenshot: Path | None = None
    notes: list = field(default_factory=list)  # worth saying, not a failure

    @property
    def url_path(self):
        """The path the server answers the page on: "/guides/ids/"."""
        path = "/" + self.path
        return path.removesuffix("index.html")


class Anchors(html.parser.HTMLParser):
    """The ids of a page and the URLs it refers to, from its HTML."""

    def __init__(self):
        super().__init__()
        self.ids = set()
        self.links = []  # (tag, attribute, value)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(name):
                self.ids.add(attrs[name])
        for name in ("href", "src"):
            if attrs.get(name) is not None and tag in ("a", "img", "link", "script"):
                self.links.append((tag, name, attrs[name]))


def parse(html_file):
    parser = Anchors()
    parser.feed(Path(html_file).read_text(encoding="utf-8"))
    parser.close()
    return parser


def find_pages(site):
    """The site's HTML pages, relative to `site`, leaving out its theme files."""
    site = Path(site)
    pages = []
    for file in sorted(site.rglob("*.html")):
        relative = file.relative_to(site)
        if relative.parts[0] not in NOT_PAGES:
            pages.append(relative.as_posix())
    return pages


def site_url(mkdocs_yml=ROOT / "mkdocs.yml"):
    """mkdocs.yml's `site_url`, or "" when it sets none."""
    found = re.search(r"^site_url:\s*(\S+)", Path(mkdocs_yml).read_text(), re.M)
    return found.group(1) if found else ""


def target_file(site, page_path, url, published=""):
    """The file of `site` that `url`, linked from `page_path`, names.

    Returns (file, fragment); file is None for a link off the site (another
    host, mailto:, ...) and fragment is "" when the URL has none.
    `published` is the site's address once deployed (mkdocs.yml's
    `site_url`): MkDocs writes links under it (the 404 page's absolute
    paths, a full address), which name this site's files too.
    """
    prefix = urllib.parse.urlsplit(published).path.rstrip("/")
    if published and url.startswith(published):
        url = "/" + url[len(published) :]
    base = "http://site/" + page_path
    absolute = urllib.parse.urljoin(base, url)
    parts = urllib.parse.urlsplit(absolute)
    if parts.scheme != "http" or parts.netloc != "site":
        return None, ""
    path = urllib.parse.unquote(parts.path)
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        path = path[len(prefix) :]
    path = path.lstrip("/")
    file = Path(site, path)
    if path == "" or path.endswith("/") or file.is_dir():
        file = file / "index.html"
    return file, urllib.parse.unquote(parts.fragment)


def check_links(site, page):
    """Broken internal links and anchors of `page`, and its links counted."""
    site = Path(site)
    anchors_of = {}
    published = site_url()
    for tag, attribute, url in parse(site / page.path).links:
        file, fragment = target_file(site, page.path, url, published)
        if file is None:
            page.external_links += tag == "a" and url.startswith(("http:", "https:"))
            continue
        page.internal_links += 1
        if not file.is_file():
            page.problems.append(f"broken link: <{tag} {attribute}={url!r}> (no file)")
            continue
        if not fragment or file.suffix != ".html":
            continue
        if file not in anchors_of:
            anchors_of[file] = parse(file).ids
        if fragment not in anchors_of[file]:
            page.problems.append(
                f"broken link: <{tag} {attribute}={url!r}> "
                f"(no id {fragment!r} on {file.relative_to(site).as_posix()})"
            )


def find_browser():
    """The path of the browser to run, or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves site/; a page asked for with `?measure` gets the measuring script."""

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        if parts.query != "measure":
            return super().do_GET()
        file = Path(self.translate_path(parts.path))
        if file.is_dir():
            file = file / "index.html"
        text = file.read_text(encoding="utf-8")
        head, end, tail = text.rpartition("</body>")
        if not end:  # HTML lets a page leave out its </body>
            head, tail = text, ""
        body = f"{head}{injected_script()}{end}{tail}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return None

    def log_message(self, format, *args):
        pass  # one line per request would bury the report


def run_browser(browser, *args):
    """Runs the browser headless on a fresh profile; returns its outputs."""
    # ignore_cleanup_errors: the browser's helper processes may still be
    # writing into the profile as it exits.
    with tempfile.TemporaryDirectory(
        prefix="docs-check-", ignore_cleanup_errors=True
    ) as profile:
        done = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=BROWSER_TIMEOUT_S,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(browser).name} exited with {done.returncode}: "
            + done.stderr.strip()[-500:]
        )
    return done


def measure(browser, origin, page):
    """Opens the page with the measuring script; returns what it measured."""
    done = run_browser(
        browser,
        f"--window-size={VIEWPORT_WIDTH},{VIEWPORT_HEIGHT}",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        # The page's console on stderr: a script error explains a missing result.
        "--enable-logging=stderr",
        "--dump-dom",
        f"{origin}{page.url_path}?measure",
    )
    found = RESULT.search(done.stdout)
    if not found:
        console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
        raise RuntimeError(
            "the measuring script wrote no result; the page's console said: "
            + (" / ".join(console)[-800:] or "nothing")
        )
    return json.loads(found.group(1))


def describe_overflow(overflow):
    kind, px = overflow["kind"], overflow["px"]
    where = f" (under #{overflow['section']})" if overflow["section"] else ""
    line = (
        f"overflow: {kind} {px} px wider than its box{where}: {overflow['excerpt']!r}"
    )
    if kind == "code" and overflow["longest"] != overflow["excerpt"].strip():
        line += (
            f"; longest line ({overflow['longest_chars']} chars): "
            f"{overflow['longest']!r}"
        )
    return line


def check_page(browser, origin, site, out, page):
    """Runs every check on `page`, recording its problems in it."""
    check_links(site, page)
    try:
        found = measure(browser, origin, page)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        page.problems.append(f"browser: {error}")
        return page
    if found["viewport"] != VIEWPORT_WIDTH:
        page.problems.append(
            f"browser: the window is {found['viewport']} px wide, "
            f"not {VIEWPORT_WIDTH} px: the measurements below do not hold"
        )
    if found["page_over"]:
        page.problems.append(
            f"overflow: page wider than the {found['width']} px window by "
            f"{found['page_over']} px; past its right edge: "
            + "; ".join(repr(c) for c in found["culprits"])
        )
    page.problems += [describe_overflow(o) for o in found["overflows"]]
    for image in found["images"]:
        if not image["loaded"]:
            page.problems.append(f"broken image: {image['src']!r} did not load")
        elif image["downscaled"]:
            page.problems.append(
                f"image downscaled: {image['src']!r} shown {image['shown']} px "
                f"wide of its {image['natural']} px "
                f"({image['shown'] / image['natural']:.0%} < {MIN_IMAGE_SCALE:.0%})"
            )
    page.screenshot = out / screenshot_name(page.path)
    height = min(max(found["height"], VIEWPORT_HEIGHT), MAX_SCREENSHOT_HEIGHT)
    if height < found["height"]:
        page.notes.append(f"screenshot cut at {height} of {found['height']} px")
    try:
        run_browser(
            browser,
            f"--window-size={VIEWPORT_WIDTH},{height}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            f"--screenshot={page.screenshot}",
            f"{origin}{page.url_path}",
        )
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        page.problems.append(f"screenshot: {error}")
        return page
    if not page.screenshot.is_file():
        page.problems.append(f"screenshot: the browser wrote no {page.screenshot}")
    return page


def screenshot_name(page_path):
    """The screenshot's file name: guides/ids/index.html gives guides-ids.png."""
    name = page_path.removesuffix("index.html").removesuffix(".html").strip("/")
    return (name.replace("/", "-") or "index") + ".png"


def serve(site):
    """Starts a server for `site` on a free port; returns it and its origin."""
    handler = partial(Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll: shutdown() waits for the server's next look at its flag.
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site", type=Path, default=ROOT / "site", help="the built site (site/)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "site-check",
        help="where the screenshots go (site-check/)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="pages checked at once (default: the cores, at most 4)",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    browser = find_browser()
    if browser is None:
        wanted = os.environ.get("CHROMIUM") or " or ".join(BROWSERS)
        sys.exit(
            f"No browser found: looked for {wanted} on PATH. Install Chromium "
            "(Debian/Ubuntu: `apt-get install chromium`), or set CHROMIUM to a "
            "Chrome or Chromium executable."
        )
    if not (args.site / "index.html").is_file():
        sys.exit(f"No site in {args.site}: build it first with `make docs`.")
    pages = [Page(path) for path in find_pages(args.site)]
    # Only the screenshots of an earlier run go: --out may name a folder
    # that holds anything else.
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    start = time.monotonic()
    server, origin = serve(args.site)
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = pool.map(
                partial(check_page, browser, origin, args.site, args.out), pages
            )
            for page in done:
                status = "ok" if not page.problems else "FAILED"
                notes = f" ({'; '.join(page.notes)})" if page.notes else ""
                lines = [f"{status:<7} {page.url_path}{notes}"]
                lines += [f"    {problem}" for problem in page.problems]
                print("\n".join(lines), flush=True)
    finally:
        server.shutdown()
    failed = [page for page in pages if page.problems]
    print(
        f"{len(pages)} pages, {len(failed)} with problems "
        f"({sum(len(page.problems) for page in pages)} in all); "
        f"{sum(page.internal_links for page in pages)} internal links checked, "
        f"{sum(page.external_links for page in pages)} external links not fetched; "
        f"screenshots at {VIEWPORT_WIDTH} px in {args.out} "
        f"({time.monotonic() - start:.0f}s, {Path(browser).name})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every measured figure the docs quote equals `docs/benchmarks.json`.

The pages quote figures through `benchmarks/quoted.py` (`<!-- fig NAME -->`
markers); these tests fail when a page differs from what the JSON gives,
when a page writes a measured-looking number by hand, and when the README's
absolute links point at nothing in this tree. They need no backend: the
suite runs them once per backend only because it runs everything so.
"""

import copy
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quoted  # noqa: E402

DATA = json.loads(quoted.JSON.read_text())
# Numbers that look measured but are not: constants, arithmetic and targets.
NOT_MEASURED = {
    ("docs/guides/language_models.md", "16 MiB"): "CHUNK_BYTES, a constant",
    ("docs/guides/language_models.md", "3x"): "the int4 target (plan.py)",
    ("docs/guides/language_models.md", "5x"): "the LoRA target (plan.py)",
    ("docs/guides/language_models.md", "8x"): "int8 to float32 is 8x the bytes",
    ("docs/guides/quantization.md", "128 MB"): "the int4 bytes of 1M x 128",
    ("docs/guides/sharding.md", "10 GB"): "4 bytes x 10M x 256",
    ("docs/guides/sharding.md", "250 MiB"): "Keras's own threshold",
    ("docs/guides/sharding.md", "5%"): "the test's tolerance",
}
URLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]


@pytest.mark.parametrize("page", quoted.PAGES)
def test_page_quotes_the_json(page):
    text = (ROOT / page).read_text()
    assert text == quoted.render(text, DATA), (
        f"{page} quotes figures that differ from docs/benchmarks.json: run "
        "`python benchmarks/quoted.py` to rewrite them"
    )


@pytest.mark.parametrize("page", quoted.PAGES)
def test_figures_render_in_place(page):
    # A comment that starts a line starts an HTML block: the paragraph ends
    # before it and its line's Markdown (a link) shows as text.
    assert not quoted.misplaced((ROOT / page).read_text()), (
        f"{page}: a figure starts a line; put a word of the sentence before "
        "it, or make it a block (its markers on lines of their own)"
    )


def test_a_figure_that_starts_a_line_is_found():
    inline = "The step takes\n<!-- fig x -->1 ms<!-- /fig --> on JAX."
    block = "Steps:\n\n<!-- fig t -->\n\n| a |\n|---|\n\n<!-- /fig -->\n"
    assert quoted.misplaced(inline) == [(2, "<!-- fig x -->1 ms<!-- /fig -->")]
    assert quoted.misplaced("It takes <!-- fig x -->1 ms<!-- /fig -->.") == []
    assert quoted.misplaced(block) == []


def test_a_quick_run_says_so():
    data = copy.deepcopy(DATA)
    data["quick"] = True
    line = quoted.machine_line(data, {("jax", "training")})
    assert line.endswith("in a `--quick` smoke run, whose numbers mean little")


@pytest.mark.parametrize("page", quoted.PAGES)
def test_page_writes_no_measured_number_by_hand(page):
    found = [
        (line, figure)
        for line, figure in quoted.hand_written((ROOT / page).read_text())
        if (page, figure) not in NOT_MEASURED
    ]
    assert not found, (
        f"{page} writes measured-looking numbers by hand (line, text): {found}. "
        "Quote them from docs/benchmarks.json with a <!-- fig NAME --> marker "
        "(benchmarks/quoted.py), or add them to NOT_MEASURED with the reason"
    )


def test_every_not_measured_number_is_still_on_its_page():
    # An entry whose number left the page would let the next one through.
    for page, figure in NOT_MEASURED:
        found = {f for _, f in quoted.hand_written((ROOT / page).read_text())}
        assert figure in found, (page, figure)


def test_pages_quote_figures_and_name_their_machine():
    quoting = []
    for page in quoted.PAGES:
        text = (ROOT / page).read_text()
        specs = [m["spec"].strip() for m in quoted.MARKER.finditer(text)]
        if specs:
            quoting.append(page)
            assert "machine" in specs, f"{page} quotes figures but not their machine"
            (machine,) = [
                m["body"]
                for m in quoted.MARKER.finditer(text)
                if m["spec"] == "machine"
            ]
            assert "2-core AMD EPYC" in machine
    assert {"README.md", "docs/index.md", "docs/guides/language_models.md"} <= set(
        quoting
    )


def test_a_new_measurement_rewrites_the_page():
    # What a later bench run does: the README's figures follow the JSON.
    text = (ROOT / "README.md").read_text()
    data = copy.deepcopy(DATA)
    for backend in quoted.BACKENDS:
        for row in data["results"][backend]["vocab_scaling"]:
            row["keras"]["median_ms"] = 1234.5
    new = quoted.render(text, data)
    assert new != text
    assert "TensorFlow 1,234 ms, JAX 1,234 ms, PyTorch 1,234 ms" in new
    # Rendering is stable: a page rendered from the JSON renders to itself.
    assert quoted.render(new, data) == new


def test_a_figure_the_json_lacks_fails_with_what_to_do():
    data = copy.deepcopy(DATA)
    data["results"]["jax"]["training"] = []
    page = "<!-- fig training_table 1000000 -->\n\nold\n\n<!-- /fig -->"
    with pytest.raises(LookupError, match=r"no training row on jax .*\(make bench\)"):
        quoted.render(page, data)
    with pytest.raises(KeyError, match="unknown figure 'typo'"):
        quoted.render("<!-- fig typo -->1<!-- /fig -->", data)


def test_figures_from_several_machines_say_which_is_which():
    data = copy.deepcopy(DATA)
    data["updates"].append(
        {
            "date": "2027-01-01 00:00 UTC",
            "cpu": "Intel(R) Xeon(R) Platinum",
            "cores": 8,
            "duration_s": 1.0,
            "backends": ["jax"],
            "sections": ["training"],
        }
    )
    sources = {("jax", "training"), ("jax", "vocab_scaling")}
    line = quoted.machine_line(data, sources)
    assert line.startswith("several machines")
    assert "training on a 8-core Intel(R) Xeon(R) Platinum (2027-01-01)" in line
    assert "vocab scaling on a 2-core AMD EPYC" in line


def test_readme_links_are_absolute_and_reach_this_tree():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    site, source = URLS["Documentation"], URLS["Source"] + "/blob/main/"
    for link in links:
        assert link.startswith("https://"), f"README link {link} is relative"
        if link.startswith(site):
            page = link.removeprefix(site).strip("/") or "index"
            assert (ROOT / "docs" / f"{page}.md").exists(), link
        elif link.startswith(source):
            assert (ROOT / link.removeprefix(source)).exists(), link
        else:
            pytest.fail(f"README link {link} is neither the docs site nor the source")


def test_install_instructions_match_the_release_state():
    changelog = (ROOT / "docs" / "changelog.md").read_text()
    readme = (ROOT / "README.md").read_text()
    unreleased = re.search(r"^## [\d.]+ \(unreleased\)", changelog, re.M)
    if unreleased:
        assert "not on PyPI yet" in readme
        assert f"REPO={URLS['Source']}" in readme


def test_a_bench_run_into_docs_flags_a_page_it_cannot_fill(capsys):
    # run.py's last step after writing docs/benchmarks.json: a page quoting
    # a row the new JSON lacks is named, and no page is half rewritten.
    import run

    data = copy.deepcopy(DATA)
    data["results"]["jax"]["training"] = []
    assert run.rewrite_quoted_figures(data) == 1
    error = capsys.readouterr().err
    page = r"(README\.md|docs/\S+\.md)"
    assert re.search(f"{page}: docs/benchmarks.json has no training row on jax", error)
    # From the JSON the pages already quote: nothing to rewrite.
    assert run.rewrite_quoted_figures(DATA) == 0
    assert "Rewrote the figures of no page" in capsys.readouterr().out

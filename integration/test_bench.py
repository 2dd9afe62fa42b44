"""`make bench` runs: a `--quick` smoke run writes every output file.

Only that the benchmark suite runs end to end and writes what the docs site
needs is checked here, never a timing: timings depend on the machine and its
load.
"""

import json
import re

import pytest
from processes import BACKENDS, ROOT, run_under

RUN = ROOT / "benchmarks" / "run.py"
SECTIONS = ("speed", "native_floor", "table_bytes", "vocab_scaling", "memory")
FIGURES = ("vocab_scaling_forward", "vocab_scaling_train", "native_floor", "memory")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    # run.py starts a process per backend itself; KERAS_BACKEND here only
    # matters for its own imports, which load no backend.
    args = ["--quick", "--backends", ",".join(BACKENDS), "--output-dir", tmp_path]
    run_under("tensorflow", RUN, *args, timeout=600)
    return tmp_path


def test_quick_benchmark_writes_json_markdown_and_figures(quick_run):
    tmp_path = quick_run
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["quick"] is True
    assert set(data["results"]) == set(BACKENDS)
    for backend in BACKENDS:
        for section in SECTIONS:
            assert data["results"][backend].get(section), (backend, section)

    page = (tmp_path / "benchmarks.md").read_text()
    assert "[benchmarks.json](benchmarks.json)" in page
    for name in FIGURES:
        assert f"(img/{name}.png)" in page, name
        image = tmp_path / "img" / f"{name}.png"
        assert image.read_bytes().startswith(PNG_SIGNATURE), image
    # The page is part of the docs site: no links out of its directory.
    assert not re.search(r"\]\((\.\./|/)", page)


def test_run_help_names_the_options():
    output = run_under("tensorflow", RUN, "--help", timeout=60)
    for option in ("--quick", "--output-dir", "--backends", "--from-json"):
        assert option in output


def test_a_run_of_some_sections_draws_only_their_figures(quick_run, tmp_path):
    # What `--sections quantized` leaves: no scaling, floor or memory data.
    data = json.loads((quick_run / "benchmarks.json").read_text())
    for result in data["results"].values():
        for section in ("vocab_scaling", "native_floor", "memory"):
            result.pop(section)
    source = tmp_path / "subset.json"
    source.write_text(json.dumps(data))
    out = tmp_path / "out"
    run_under("tensorflow", RUN, "--from-json", source, "--output-dir", out)

    assert not (out / "img").exists() or not list((out / "img").iterdir())
    page = (out / "benchmarks.md").read_text()
    assert page.count("Figure not drawn: this run did not measure its section") == 4
    assert "(img/" not in page

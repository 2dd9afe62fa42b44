"""Choosing backends: `INTEGRATION_BACKENDS` and `tests/run_backends.py`
refuse a name that is not a backend, and say which ones are."""

import importlib.util
import re
import subprocess
import sys

import pytest
from processes import ALL_BACKENDS, ROOT, selected_backends


def test_selection_keeps_the_backends_order_and_defaults_to_all():
    assert selected_backends("") == ALL_BACKENDS
    assert selected_backends("torch, jax") == ("jax", "torch")
    assert selected_backends("tensorflow") == ("tensorflow",)


def test_unknown_integration_backend_is_refused():
    with pytest.raises(ValueError) as info:
        selected_backends("jax,torchh")
    assert str(info.value) == (
        "INTEGRATION_BACKENDS must name backends among tensorflow, jax, torch, "
        "separated by spaces or commas. Received: "
        "INTEGRATION_BACKENDS='jax,torchh' (unknown: torchh)."
    )


def run_runner(*args):
    """Runs tests/run_backends.py with `args` (refused before any suite)."""
    return subprocess.run(
        [sys.executable, ROOT / "tests" / "run_backends.py", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_runner_refuses_an_unknown_backend_before_running_anything():
    done = run_runner("jax", "torchh")
    assert done.returncode == 2
    assert "unknown backends ['torchh']; choose from" in done.stderr
    assert "unit[" not in done.stdout  # no suite started


def test_runner_refuses_fewer_than_one_job():
    done = run_runner("--jobs", "0")
    assert done.returncode == 2
    assert "--jobs must be at least 1; received 0" in done.stderr
    assert "unit[" not in done.stdout


def test_runner_refuses_negative_durations():
    done = run_runner("--durations", "-1")
    assert done.returncode == 2
    assert "--durations must be 0 or more; received -1" in done.stderr


def load_runner():
    spec = importlib.util.spec_from_file_location(
        "run_backends", ROOT / "tests" / "run_backends.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_prints_a_suites_slowest_tests(tmp_path, capsys):
    suite = tmp_path / "test_timed.py"
    suite.write_text(
        "import time\n\n"
        "def test_slow():\n    time.sleep(1.2)\n\n"
        "def test_fast():\n    pass\n"
    )
    assert load_runner().run("timed", "torch", [str(suite)], durations=3)
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith("timed")
    assert "2 passed" in report[0]
    # Only the test over --durations-min (1 s) is listed, under the summary.
    assert len(report) == 2
    assert re.fullmatch(r"    1\.\d\ds call +.*test_timed\.py::test_slow", report[1])

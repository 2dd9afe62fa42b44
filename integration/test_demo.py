"""`make demo` runs examples/quickstart.py; it must work on every backend."""

import pytest
from conftest import BACKENDS, ROOT, run_under


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart_runs(backend):
    output = run_under(backend, ROOT / "examples" / "quickstart.py", timeout=300)
    assert f"backend: {backend}" in output
    assert "-> vectors of shape (32, 10, 64)" in output
    assert "InvalidIdError: Layer 'tokens' received an invalid id 1000" in output
    assert "base table unchanged by training: True" in output
    assert "predictions, original vs reloaded: max abs difference 0.0" in output
    losses = output.split("loss per epoch: ")[1].splitlines()[0].split(", ")
    assert float(losses[-1]) < float(losses[0])

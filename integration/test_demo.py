"""`make demo` runs examples/quickstart.py; it must work on every backend."""

import pytest
from processes import BACKENDS, ROOT, run_under

QUICKSTART = ROOT / "examples" / "quickstart.py"


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart_runs(backend):
    assert QUICKSTART.is_file(), f"{QUICKSTART} is missing"
    output = run_under(backend, QUICKSTART, timeout=300)  # asserts exit code 0
    assert "(32, 10, 64)" in output
    assert f"backend: {backend}" in output
    assert "InvalidIdError: Layer 'tokens' received an invalid id 1000" in output
    assert "base table unchanged by training: True" in output
    assert "predictions, original vs reloaded: max abs difference 0.0" in output
    assert "dtype policy int4/128_from_float32" in output
    assert "int4 model saved and reloaded: max abs difference 0.0" in output

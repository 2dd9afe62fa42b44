"""The layer's rows and mask after saving under one backend and reloading
under another (`.keras` and `.weights.h5`), compared bit for bit.

With LoRA the rows include `A[ids] @ B`, a matrix product whose last bit
depends on the backend's kernel (XLA's dot against TensorFlow's and PyTorch's
GEMM): those rows are bit-identical when saver and loader share a backend,
and equal within float32 rounding across backends. Every other case is
bit-identical across all nine pairs. A `ReversibleEmbedding`'s logits are
products too: bit-identical when saver and loader share a backend, within
float32 rounding across backends."""

import itertools
import json

import numpy as np
import pytest
from processes import BACKENDS

CASES = (
    "plain",
    "mask_zero",
    "lora",
    "mixed_bfloat16",
    "int8",
    "int4",
    "int4_lora",
    "reversible_untied",
    "reversible_lora",
    "reversible_int8_untied",
    "reversible_int4_untied",
    "reversible_int4_lora",
)
MASKED = ("mask_zero", "lora", "int4")
PAIRS = list(itertools.product(BACKENDS, BACKENDS))


@pytest.fixture(scope="module")
def outputs(saved_scripts):
    return saved_scripts / "layer_outputs"


@pytest.mark.parametrize("fmt", ["keras", "weights"])
@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_reloaded_rows_and_mask_are_bitwise_equal(outputs, case, saver, loader, fmt):
    reference = outputs / saver / "reference"
    loaded = outputs / saver / f"loaded_by_{loader}"
    rows = np.load(loaded / f"{case}_{fmt}_rows.npy")
    expected = np.load(reference / f"{case}_rows.npy")
    if case.startswith("reversible") and saver != loader:
        # Logits of size ~10, sums of 12 products each.
        np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
    elif "lora" in case and saver != loader:
        np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(rows, expected)
    mask = loaded / f"{case}_{fmt}_mask.npy"
    assert mask.exists() == (case in MASKED)
    if case in MASKED:
        np.testing.assert_array_equal(
            np.load(mask), np.load(reference / f"{case}_mask.npy")
        )
    facts = json.loads((loaded / f"{case}_{fmt}_facts.json").read_text())
    expected = json.loads((reference / f"{case}_facts.json").read_text())
    assert facts == expected
    assert facts["output_dtype"] == (
        "bfloat16" if case == "mixed_bfloat16" else "float32"
    )

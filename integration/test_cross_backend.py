"""Models saved under one backend and loaded under another, in fresh processes."""

import itertools
import json

import numpy as np
import pytest
from conftest import BACKENDS

PAIRS = list(itertools.product(BACKENDS, BACKENDS))


def load_npz(path):
    with np.load(path) as data:
        return dict(data)


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("name", ["plain", "lora"])
def test_keras_file_reloads_on_every_backend(saved_everywhere, saver, loader, name):
    reference = saved_everywhere / saver / "reference"
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / f"{name}_predictions.npy"),
        np.load(reference / f"{name}_predictions.npy"),
        atol=1e-6,
    )
    weights = load_npz(loaded / f"{name}_weights.npz")
    expected = load_npz(reference / f"{name}_weights.npz")
    assert sorted(weights) == sorted(expected)
    for key in expected:  # bit-identical variables, adapters included
        np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)
    if name == "lora":
        assert any("lora_embeddings_a" in key for key in weights)


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
def test_lora_training_resumes_on_another_backend(saved_everywhere, saver, loader):
    after = load_npz(
        saved_everywhere / saver / f"loaded_by_{loader}" / "lora_after_step.npz"
    )
    expected = load_npz(saved_everywhere / saver / "reference" / "lora_after_step.npz")
    for key in expected:
        np.testing.assert_allclose(after[key], expected[key], atol=1e-6, err_msg=key)
    table = [k for k in expected if k.endswith("tokens.embeddings")][0]
    before = load_npz(saved_everywhere / saver / "reference" / "lora_weights.npz")
    # The step trained the adapters and left the frozen table alone.
    np.testing.assert_array_equal(after[table], before[table])


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
def test_weights_cross_with_keras_embedding(saved_everywhere, saver, loader):
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / "keras_into_ours.npy"),
        np.load(saved_everywhere / saver / "keras_layer_predictions.npy"),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.load(loaded / "ours_into_keras.npy"),
        np.load(saved_everywhere / saver / "our_layer_predictions.npy"),
        atol=1e-6,
    )


def test_invalid_ids_same_error_on_every_backend(saved_everywhere):
    reports = {
        b: json.loads((saved_everywhere / b / "invalid.json").read_text())
        for b in BACKENDS
    }
    messages = {b: r["eager_message"] for b, r in reports.items()}
    assert messages["tensorflow"] is not None
    assert "received an invalid id 12 at position (0, 1)" in messages["tensorflow"]
    assert len(set(messages.values())) == 1, messages
    for backend in ("tensorflow", "jax"):
        assert reports[backend]["compiled_invalid_rows"] == [[0.0] * 8, [0.0] * 8]

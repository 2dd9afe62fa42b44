"""Models saved under one backend and loaded under another, in fresh processes.

The `saved_everywhere` fixture (conftest.py) holds what scripts/cross_backend.py
wrote, run with the other save/load scripts by `saved_scripts`:
each backend saves, then each backend loads what every backend saved. The
tests compare the files those processes wrote.
"""

import itertools
import json

import numpy as np
import pytest
from processes import BACKENDS, needs

PAIRS = list(itertools.product(BACKENDS, BACKENDS))
MODELS = ("lstm", "pooled", "lora", "int8", "int4_grouped", "int4_lora")
# What each model's `tokens` layer is after reloading.
EXPECTED_LAYERS = {
    "lstm": (None, "float32", ["embeddings"]),
    "pooled": (None, "float32", ["embeddings"]),
    "lora": (None, "float32", ["lora_embeddings_a", "lora_embeddings_b"]),
    "int8": ("int8", "int8_from_float32", []),
    "int4_grouped": ("int4", "int4/3_from_float32", []),
    "int4_lora": (
        "int4",
        "int4/-1_from_float32",
        ["lora_embeddings_a", "lora_embeddings_b"],
    ),
}
OUR_CLASS = "keras_ext_embedding.embedding.Embedding"
ADAPTERS = ["lora_embeddings_a", "lora_embeddings_b"]


def load_npz(path):
    with np.load(path) as data:
        return dict(data)


def load_json(path):
    return json.loads(path.read_text())


def key_of(weights, variable):
    """The key of the `tokens` layer's `variable` in a weights dict."""
    (key,) = [k for k in weights if k.endswith(f"tokens.{variable}")]
    return key


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("name", MODELS)
def test_keras_file_reloads_on_every_backend(saved_everywhere, saver, loader, name):
    reference = saved_everywhere / saver / "reference"
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    predictions = np.load(loaded / f"{name}_predictions.npy")
    np.testing.assert_allclose(
        predictions, np.load(reference / f"{name}_predictions.npy"), atol=1e-6
    )
    # mask_zero still reaches the encoder: padding changes nothing.
    np.testing.assert_allclose(
        np.load(loaded / f"{name}_unpadded.npy"), predictions[:1], atol=1e-6
    )
    weights = load_npz(loaded / f"{name}_weights.npz")
    expected = load_npz(reference / f"{name}_weights.npz")
    assert sorted(weights) == sorted(expected)
    for key in expected:  # bit-identical variables, adapters included
        np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)

    layer = load_json(loaded / f"{name}_layer.json")
    assert layer["class"] == OUR_CLASS  # loaded without custom_objects
    assert layer["mask_zero"] is True
    mode, policy, trainable = EXPECTED_LAYERS[name]
    assert (layer["quantization_mode"], layer["dtype_policy"]) == (mode, policy)
    assert layer["trainable"] == trainable
    assert layer["lora_enabled"] is (trainable == ADAPTERS)
    if name == "lora":
        assert (layer["lora_rank"], layer["lora_alpha"]) == (4, 8)
    if trainable == ADAPTERS:
        for adapter in ADAPTERS:
            key_of(weights, adapter)


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("name", MODELS)
def test_training_resumes_on_another_backend(saved_everywhere, saver, loader, name):
    """One SGD step after reloading == the same step in the saving process."""
    reference = saved_everywhere / saver / "reference"
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    after = load_npz(loaded / f"{name}_after_step.npz")
    expected = load_npz(reference / f"{name}_after_step.npz")
    assert sorted(after) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(after[key], expected[key], atol=1e-6, err_msg=key)

    before = load_npz(reference / f"{name}_weights.npz")
    table = key_of(before, "embeddings")
    trainable = EXPECTED_LAYERS[name][2]
    if trainable == ["embeddings"]:
        assert not np.array_equal(after[table], before[table])
    else:
        # The step left the frozen (or quantized) table alone.
        np.testing.assert_array_equal(after[table], before[table])
    if trainable == ADAPTERS:
        b = key_of(before, "lora_embeddings_b")
        assert not np.array_equal(after[b], before[b])


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
def test_weights_file_from_keras_embedding_loads_into_ours(
    saved_everywhere, saver, loader
):
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / "keras_into_ours.npy"),
        np.load(saved_everywhere / saver / "keras_layer_predictions.npy"),
        atol=1e-6,
    )


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
def test_weights_file_from_ours_loads_into_keras_embedding(
    saved_everywhere, saver, loader
):
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / "ours_into_keras.npy"),
        np.load(saved_everywhere / saver / "our_layer_predictions.npy"),
        atol=1e-6,
    )


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize(
    ("loaded_file", "saved_file"),
    [
        ("keras_int8_into_ours.npy", "keras_int8_predictions.npy"),
        ("our_int4_into_keras.npy", "our_int4_predictions.npy"),
    ],
    ids=["keras_int8_into_ours", "our_int4_into_keras"],
)
def test_quantized_weights_files_cross_with_keras_embedding(
    saved_everywhere, saver, loader, loaded_file, saved_file
):
    loaded = saved_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / loaded_file),
        np.load(saved_everywhere / saver / saved_file),
        atol=1e-6,
    )


RANGE = "Ids must be whole numbers in [0, 11] (input_dim=12)."
EAGER_CASES = {
    "numpy_int64": "received an invalid id 12 at position (0, 1).",
    "list": "received an invalid id 12 at position (1, 0).",
    "numpy_uint64": "received an invalid id 9223372036854775808 at position (1,).",
    "tensor_int32": "received an invalid id -3 at position (0, 1, 1).",
    "tensor_float32": "received an invalid id 1.5 at position (1,).",
}


@pytest.fixture(scope="module")
def invalid_reports(saved_everywhere):
    return {b: load_json(saved_everywhere / b / "invalid.json") for b in BACKENDS}


@pytest.mark.parametrize("case", EAGER_CASES)
def test_invalid_id_error_is_the_same_on_every_backend(invalid_reports, case):
    errors = {b: report["eager"][case] for b, report in invalid_reports.items()}
    for backend, error in errors.items():
        assert error is not None, f"{backend}: no error for {case}"
        assert error["type"] == "InvalidIdError", (backend, error)
        assert error["is_value_error"], backend
        assert f"Layer 'tokens' {EAGER_CASES[case]} {RANGE}" in error["message"]
    # The whole text, not just the layer's sentence: a user switching backends
    # sees the same error.
    messages = {b: error["message"] for b, error in errors.items()}
    assert len(set(messages.values())) == 1, messages
    assert all(m.startswith("Layer 'tokens' ") for m in messages.values()), messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_id_in_eager_model_call_raises(invalid_reports, backend):
    error = invalid_reports[backend]["model_call"]
    assert error is not None and error["is_invalid_id_error"], error
    assert "received an invalid id 12 at position (0, 1)." in error["message"]
    assert RANGE in error["message"]


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=needs(b)) for b in ("tensorflow", "jax")]
)
def test_invalid_id_in_compiled_predict_gives_zeros(invalid_reports, backend):
    report = invalid_reports[backend]
    assert report["predict_error"] is None, report["predict_error"]
    valid, too_large, negative = report["predict_rows"]
    assert valid == report["table_row_1"]
    assert too_large == [0.0] * 8
    assert negative == [0.0] * 8


@needs("torch")
def test_invalid_id_in_torch_predict_raises(invalid_reports):
    # Keras runs predict eagerly on PyTorch, so the ids can be checked.
    error = invalid_reports["torch"]["predict_error"]
    assert error is not None and error["is_invalid_id_error"], error
    assert "received an invalid id 12 at position (0, 1)." in error["message"]

"""A small layer test helper on public Keras API.

Keras's own `run_layer_test` is private. `run_layer_checks` runs what a user
relies on for one configuration of the layer: the config round trip, build, a
symbolic call, an eager call against a NumPy reference, one training step and
mixed precision.
"""

import json

import keras
import numpy as np
from keras import ops


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def to_numpy(x):
    """Any tensor as float64 NumPy (through float32, which bfloat16 needs)."""
    return ops.convert_to_numpy(ops.cast(x, "float32")).astype("float64")


def table_of(layer):
    """The layer's effective table (merged with LoRA) as float64 NumPy."""
    return to_numpy(layer.embeddings)


def config_json(config):
    return json.dumps(config, sort_keys=True)


def assert_rows(layer, out, ids, cast_to=None):
    """`out` holds the table's rows at `ids`: exact, or close with LoRA.

    With LoRA the reference table is merged with the adapters
    (`table + s * A @ B`), while the layer adds `s * A[ids] @ B` row by row: the
    same sums in another order, equal up to float32 rounding.
    """
    table = layer.embeddings
    if cast_to is not None:
        table = ops.cast(table, cast_to)
    expected = to_numpy(table)[np.asarray(ids)]
    if layer.lora_enabled:
        tolerance = 1e-3 if cast_to in ("float16", "bfloat16") else 1e-6
        np.testing.assert_allclose(
            to_numpy(out), expected, rtol=tolerance, atol=tolerance
        )
    else:
        np.testing.assert_array_equal(to_numpy(out), expected)


def check_config_round_trip(layer):
    config = layer.get_config()
    json.dumps(config)  # The config is plain JSON.
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    assert config_json(clone.get_config()) == config_json(config)

    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == keras.saving.get_registered_name(
        type(layer)
    )
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(revived) is type(layer)
    assert config_json(revived.get_config()) == config_json(config)


def check_fit_step(make_layer, ids):
    """One SGD step: finite loss, and the layer's trainable variables move."""
    layer = make_layer()
    model = keras.Sequential(
        [
            keras.Input(shape=ids.shape[1:], dtype=str(ids.dtype)),
            layer,
            keras.layers.Dense(1),  # Dense keeps a mask, unlike Flatten.
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [ops.convert_to_numpy(v).copy() for v in layer.trainable_weights]
    assert before, "the layer has no trainable variables to train"
    targets = np.ones((*ids.shape, 1), dtype="float32")
    history = model.fit(ids, targets, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for variable, old in zip(layer.trainable_weights, before, strict=True):
        new = ops.convert_to_numpy(variable)
        assert np.isfinite(new).all(), variable.name
        # LoRA's B starts at zero, so A gets a zero gradient on the first
        # step; every other variable must move.
        if variable.name != "lora_embeddings_a":
            assert not np.array_equal(old, new), variable.name


def check_mixed_precision(make_layer, ids):
    """Under mixed_float16: float32 variables, float16 outputs, cast rows."""
    layer = make_layer(dtype="mixed_float16")
    symbolic = layer(keras.Input(shape=ids.shape[1:], dtype=str(ids.dtype)))
    assert symbolic.dtype == "float16"
    out = layer(ids)
    assert dtype_of(out) == "float16"
    assert [dtype_of(v) for v in layer.weights] == ["float32"] * len(layer.weights)
    assert_rows(layer, out, ids, cast_to="float16")


def run_layer_checks(
    make_layer,
    ids,
    expected_output_shape,
    *,
    expected_weights=None,
    check_fit=True,
    check_mixed=True,
):
    """Runs the standard checks for one configuration of a lookup layer.

    Args:
        make_layer: Callable; `make_layer(**overrides)` returns a new layer
            (overrides such as `dtype="mixed_float16"`).
        ids: Batched NumPy ids, all valid.
        expected_output_shape: The eager output shape for `ids`.
        expected_weights: Optional list of `(name, shape)` of the variables,
            in creation order, after build.
        check_fit: Whether to run one training step.
        check_mixed: Whether to check the mixed_float16 policy.

    Returns:
        The built layer used for the eager call.
    """
    ids = np.asarray(ids)
    expected_output_shape = tuple(expected_output_shape)
    layer = make_layer()
    check_config_round_trip(layer)
    config = layer.get_config()

    layer.build(ids.shape)
    assert layer.built
    if expected_weights is not None:
        assert [(v.name, tuple(v.shape)) for v in layer.weights] == [
            (name, tuple(shape)) for name, shape in expected_weights
        ]

    symbolic = layer(keras.Input(shape=ids.shape[1:], dtype=str(ids.dtype)))
    assert isinstance(symbolic, keras.KerasTensor)
    assert tuple(symbolic.shape) == (None, *expected_output_shape[1:])
    assert symbolic.dtype == layer.compute_dtype

    out = layer(ids)
    assert tuple(out.shape) == expected_output_shape
    assert dtype_of(out) == layer.compute_dtype
    assert_rows(layer, out, ids)
    tensor_out = layer(ops.convert_to_tensor(ids))
    np.testing.assert_array_equal(to_numpy(tensor_out), to_numpy(out))

    # Building and calling leave the config as it was.
    assert config_json(layer.get_config()) == config_json(config)
    check_config_round_trip(layer)

    if check_fit:
        check_fit_step(make_layer, ids)
    if check_mixed:
        check_mixed_precision(make_layer, ids)
    return layer

"""A small layer test helper on public Keras API.

Keras's own `run_layer_test` is private; this checks what a user relies on for
any configuration of the layer: config round trip, build, symbolic and eager
calls, one training step, and mixed precision.
"""

import json

import keras
import numpy as np
from keras import ops


def to_numpy(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def table_of(layer):
    """The layer's effective table (merged with LoRA) as float64 numpy."""
    return ops.convert_to_numpy(ops.cast(layer.embeddings, "float32")).astype("float64")


def run_layer_checks(make_layer, ids, *, check_fit=True, check_mixed=True):
    """Runs the standard checks for `make_layer(**overrides)` on 2-D `ids`."""
    ids = np.asarray(ids)
    layer = make_layer()

    # Config round trip: same JSON, directly and through serialization.
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(revived) is type(layer)
    assert json.dumps(revived.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )

    # Symbolic call.
    symbolic_ids = keras.Input(shape=ids.shape[1:], dtype="int32", batch_size=None)
    symbolic_out = layer(symbolic_ids)
    assert tuple(symbolic_out.shape) == (None, *ids.shape[1:], layer.output_dim)
    assert symbolic_out.dtype == layer.compute_dtype

    # Eager call: exact rows of the table.
    out = layer(ids)
    assert tuple(out.shape) == (*ids.shape, layer.output_dim)
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    expected = table_of(layer)[ids]
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-2, atol=1e-3)

    # One fit step changes the trainable variables and keeps the loss finite.
    if check_fit:
        model = keras.Sequential(
            [
                keras.Input(shape=ids.shape[1:], dtype="int32"),
                make_layer(),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [ops.convert_to_numpy(v).copy() for v in model.trainable_weights]
        history = model.fit(ids, np.ones((len(ids), 1)), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [ops.convert_to_numpy(v) for v in model.trainable_weights]
        # Every variable moves, except LoRA's A on the first step: B starts
        # at zero, so A's gradient is zero until B has moved.
        changed = [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]
        names = [v.name for v in model.trainable_weights]
        assert all(
            c or n == "lora_embeddings_a" for c, n in zip(changed, names, strict=True)
        )
        assert any(changed)

    # Mixed precision: float32 variables, float16 outputs.
    if check_mixed:
        mixed = make_layer(dtype="mixed_float16")
        out = mixed(ids)
        assert keras.backend.standardize_dtype(out.dtype) == "float16"
        assert all(
            keras.backend.standardize_dtype(v.dtype) == "float32" for v in mixed.weights
        )
        np.testing.assert_allclose(
            to_numpy(out), table_of(mixed)[ids], rtol=1e-3, atol=1e-3
        )
    return layer

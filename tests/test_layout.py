"""`shard_embeddings`: layout rules for `keras.distribution.ModelParallel`.

The rules themselves are plain data on every backend; training under them is
in integration/test_sharded.py (JAX, 8 virtual devices).
"""

import keras
import numpy as np
import pytest

from keras_ext_embedding import shard_embeddings


def layout_map():
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], ["cpu:0"])
    return keras.distribution.LayoutMap(mesh)


def axes(layout):
    return None if layout is None else tuple(layout.axes)


def test_rules_shard_tables_lora_a_and_scales_by_rows():
    rules = shard_embeddings(layout_map(), "tokens")
    assert axes(rules["tokens/embeddings"]) == ("model", None)
    assert axes(rules["tokens/lora_embeddings_a"]) == ("model", None)
    assert axes(rules["tokens/reverse_embeddings"]) == (None, "model")
    # Keras's quantized layers derive nothing: their scales get rules.
    assert axes(rules["tokens/embeddings_scale"]) == ("model",)
    assert axes(rules["tokens/embeddings_zero"]) == ("model",)
    # B, the reverse scales and other layers' variables are left to the
    # default (replicated), or, in our layers, to the table's layout.
    assert rules["tokens/lora_embeddings_b"] is None
    assert rules["tokens/reverse_embeddings_scale"] is None
    assert rules["tokens/embeddings_momentum"] is None
    assert rules["items/embeddings"] is None
    assert rules["dense/kernel"] is None


def test_default_layer_name_matches_every_layer_without_overlaps():
    rules = shard_embeddings(layout_map())
    for path in ("users/embeddings", "model/items/embeddings"):
        assert axes(rules[path]) == ("model", None)
    assert axes(rules["items/lora_embeddings_a"]) == ("model", None)


def test_other_axis_name():
    mesh = keras.distribution.DeviceMesh((1, 1), ["data", "rows"], ["cpu:0"])
    rules = shard_embeddings(keras.distribution.LayoutMap(mesh), "tokens", axis="rows")
    assert axes(rules["tokens/embeddings"]) == ("rows", None)


def test_unknown_axis_is_refused():
    with pytest.raises(ValueError, match=r"axis names \['batch', 'model'\]"):
        shard_embeddings(layout_map(), axis="shards")


def test_bad_regular_expression_is_refused():
    with pytest.raises(ValueError, match="must be a regular expression"):
        shard_embeddings(layout_map(), "tokens[")


# --- Layouts on the backends whose variables Keras never shards. ---

NO_SHARDING = pytest.mark.skipif(
    keras.config.backend() == "jax",
    reason="JAX shards variables: integration/test_sharded.py checks them on 8 "
    "virtual devices.",
)


def two_device_model_parallel():
    # Device names alone: neither TensorFlow nor PyTorch looks them up, as
    # neither lays variables out.
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], ["cpu:0", "cpu:1"])
    return keras.distribution.ModelParallel(
        layout_map=shard_embeddings(keras.distribution.LayoutMap(mesh), "tokens"),
        batch_dim_name="batch",
    )


@NO_SHARDING
def test_a_layout_the_backend_cannot_honour_is_reported():
    from keras_ext_embedding import Embedding

    # Made outside the scope: Keras 3.15's PyTorch backend warns about its
    # own optimizer's learning rate variable read under a distribution.
    layer = Embedding(100, 8, optimizer="adam", name="tokens")
    with two_device_model_parallel().scope(), pytest.warns(UserWarning) as caught:
        layer.build()
    messages = [str(w.message) for w in caught]
    backend = keras.config.backend()
    # The table, and each slot derived from it: every variable the layer
    # would have sharded is named, with what happens instead.
    for path in ("tokens/embeddings", "tokens/embeddings_momentum"):
        assert any(
            f"Layer 'tokens': the distribution lays out `{path}` (100, 8) sharded, "
            f"but `keras.distribution` shards variables on the JAX backend only: "
            f"on {backend} the variable is whole (replicated)" in m
            for m in messages
        ), messages
    # The step counter is not sharded anywhere: no warning names it.
    assert not any("embeddings_iteration" in m for m in messages)
    # The layer works, replicated.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer(np.array([[3]], "int32")))[0, 0],
        keras.ops.convert_to_numpy(layer.embeddings)[3],
    )


@NO_SHARDING
def test_a_replicated_layout_is_not_reported():
    from keras_ext_embedding import Embedding

    mesh = keras.distribution.DeviceMesh((2, 1), ["batch", "model"], ["cpu:0", "cpu:1"])
    distribution = keras.distribution.ModelParallel(
        layout_map=shard_embeddings(keras.distribution.LayoutMap(mesh), "tokens"),
        batch_dim_name="batch",
    )
    with distribution.scope():
        # A "model" axis of one device: nothing to shard, nothing to say
        # (pytest turns any warning into an error).
        Embedding(100, 8, name="tokens").build()

"""`shard_embeddings`: layout rules for `keras.distribution.ModelParallel`.

The rules themselves are plain data on every backend; training under them is
in integration/test_sharded.py (JAX, 8 virtual devices).
"""

import keras
import pytest

from keras_ext_embedding import shard_embeddings


def layout_map():
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], ["cpu:0"])
    return keras.distribution.LayoutMap(mesh)


def axes(layout):
    return None if layout is None else tuple(layout.axes)


def test_rules_shard_tables_and_lora_a_by_rows():
    rules = shard_embeddings(layout_map(), "tokens")
    assert axes(rules["tokens/embeddings"]) == ("model", None)
    assert axes(rules["tokens/lora_embeddings_a"]) == ("model", None)
    # B, the scales and other layers' variables are left to the default
    # (replicated).
    assert rules["tokens/lora_embeddings_b"] is None
    assert rules["tokens/embeddings_scale"] is None
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

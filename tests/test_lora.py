"""LoRA: enabling, variables, the forward pass, training and merging.

Helpers are local so this file depends only on the package and public Keras API.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
VOCAB, DIM = 50, 8
LORA_WEIGHTS = ["lora_embeddings_a", "lora_embeddings_b"]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def mixed_float16_policy():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def numpy_of(x):
    """Any tensor or variable as float64 numpy (float32 first for bfloat16)."""
    return ops.convert_to_numpy(ops.cast(x, "float32")).astype("float64")


def raw(variable):
    """A variable's values in its own dtype, for bitwise comparisons."""
    return np.array(ops.convert_to_numpy(variable))


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def built(**kwargs):
    layer = Embedding(VOCAB, DIM, **kwargs)
    layer.build()
    return layer


def randomize_adapters(layer, rng):
    layer.lora_embeddings_a.assign(
        rng.normal(size=layer.lora_embeddings_a.shape).astype("float32")
    )
    layer.lora_embeddings_b.assign(
        rng.normal(size=layer.lora_embeddings_b.shape).astype("float32")
    )


def merged_reference(layer):
    """`E + alpha / r * A @ B` in float64 from the layer's own variables."""
    table = numpy_of(layer._embeddings)
    a, b = numpy_of(layer.lora_embeddings_a), numpy_of(layer.lora_embeddings_b)
    return table + (layer.lora_alpha / layer.lora_rank) * (a @ b)


def lora_reference(layer, ids):
    """`E[ids] + alpha / r * A[ids] @ B`, gathered first as the layer does."""
    table = numpy_of(layer._embeddings)
    a, b = numpy_of(layer.lora_embeddings_a), numpy_of(layer.lora_embeddings_b)
    return table[ids] + (layer.lora_alpha / layer.lora_rank) * (a[ids] @ b)


def pooled_model(layer, length=6):
    """Embedding -> GlobalAveragePooling1D -> Dense(1), a tiny regressor."""
    return keras.Sequential(
        [
            keras.Input((length,), dtype="int32"),
            layer,
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="head"),
        ]
    )


def toy_task(rng, n=64, length=6, seen=VOCAB // 2):
    """Ids drawn from the first `seen` rows only; target: their scaled mean."""
    ids = rng.integers(0, seen, size=(n, length)).astype("int32")
    y = (ids.mean(axis=1, keepdims=True) / seen - 0.5).astype("float32")
    return ids, y


# enable_lora errors: the same type and message as keras.layers.Embedding.


def keras_and_ours_error(case):
    """The exceptions that `case` raises with Keras's layer and with ours."""
    errors = []
    for cls in (keras.layers.Embedding, Embedding):
        if case == "constraint":
            layer = cls(10, 4, embeddings_constraint="non_neg")
            layer.build()
        else:
            layer = cls(10, 4)
            if case == "twice":
                layer.build()
                layer.enable_lora(2)
        with pytest.raises(ValueError) as info:
            layer.enable_lora(2)
        errors.append(info.value)
    return errors


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("constraint", "Lora is incompatible with embedding constraints."),
        ("not_built", "Cannot enable lora on a layer that isn't yet built."),
    ],
)
def test_enable_lora_errors_match_keras(case, fragment):
    theirs, ours = keras_and_ours_error(case)
    assert type(ours) is type(theirs) is ValueError
    assert str(ours) == str(theirs)
    assert fragment in str(ours)


def test_enable_lora_twice_names_the_layer_its_rank_and_the_way_out():
    theirs, ours = keras_and_ours_error("twice")
    assert type(ours) is type(theirs) is ValueError
    # Keras's words first (its tests match them), then what Keras leaves out.
    assert str(theirs).startswith("lora is already enabled")
    assert str(ours) == (
        "lora is already enabled on layer 'embedding_1', with rank 2 "
        "(lora_alpha=2): it can be enabled only once per layer. To enable LoRA "
        "again (received: rank=2), call `merge_lora()` first: it folds the "
        "adapters into the table and removes them."
    )


def test_enable_lora_twice_keeps_first_adapters():
    layer = built(name="tokens")
    layer.enable_lora(2, lora_alpha=3)
    with pytest.raises(
        ValueError,
        match=r"lora is already enabled on layer 'tokens', with rank 2 "
        r"\(lora_alpha=3\).*\(received: rank=4\), call `merge_lora\(\)` first",
    ):
        layer.enable_lora(4)
    assert (layer.lora_rank, layer.lora_alpha) == (2, 3)
    assert [v.name for v in layer.weights] == ["embeddings", *LORA_WEIGHTS]
    assert tuple(layer.lora_embeddings_a.shape) == (VOCAB, 2)
    # The way out the message gives: merge, then enable again.
    layer.merge_lora()
    layer.enable_lora(4)
    assert (layer.lora_rank, layer.lora_alpha) == (4, 4)
    assert tuple(layer.lora_embeddings_a.shape) == (VOCAB, 4)


@pytest.mark.parametrize(
    ("rank", "received"),
    [
        (0, "rank=0 (of type int)"),
        (-1, "rank=-1 (of type int)"),
        (2.5, "rank=2.5 (of type float)"),
        (True, "rank=True (of type bool)"),
        (None, "rank=None (of type NoneType)"),
        ("4", "rank=4 (of type str)"),
    ],
)
def test_enable_lora_rank_must_be_positive_int(rank, received):
    layer = built()
    with pytest.raises(ValueError) as info:
        layer.enable_lora(rank)
    assert str(info.value) == (
        f"`rank` must be a positive integer. Received: {received}."
    )
    # A refused call leaves the layer as it was, and LoRA can still be enabled.
    assert not layer.lora_enabled
    assert [v.name for v in layer.weights] == ["embeddings"]
    assert layer._embeddings.trainable
    layer.enable_lora(2)
    assert layer.lora_enabled


@pytest.mark.parametrize(
    ("alpha", "received"),
    [
        (0, "lora_alpha=0 (of type int)"),
        (-2.0, "lora_alpha=-2.0 (of type float)"),
        (float("nan"), "lora_alpha=nan (of type float)"),
        ("8", "lora_alpha=8 (of type str)"),
        (False, "lora_alpha=False (of type bool)"),
    ],
)
def test_enable_lora_alpha_must_be_positive_number(alpha, received):
    layer = built()
    with pytest.raises(ValueError) as info:
        layer.enable_lora(2, lora_alpha=alpha)
    assert str(info.value) == (
        f"`lora_alpha` must be a positive number. Received: {received}."
    )
    assert not layer.lora_enabled
    assert [v.name for v in layer.weights] == ["embeddings"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"lora_rank": 0},
            "`lora_rank` must be a positive integer. "
            "Received: lora_rank=0 (of type int).",
        ),
        (
            {"lora_rank": True},
            "`lora_rank` must be a positive integer. "
            "Received: lora_rank=True (of type bool).",
        ),
        (
            {"lora_rank": 2, "lora_alpha": -1},
            "`lora_alpha` must be a positive number. "
            "Received: lora_alpha=-1 (of type int).",
        ),
    ],
)
def test_constructor_lora_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError) as info:
        Embedding(VOCAB, DIM, **kwargs)
    assert str(info.value) == message


# Constructor arguments and configuration.


def test_constructor_alpha_survives_build_config_and_from_config():
    layer = Embedding(VOCAB, DIM, lora_rank=2, lora_alpha=16)
    assert not layer.lora_enabled
    layer.build()
    assert layer.lora_enabled
    assert (layer.lora_rank, layer.lora_alpha) == (2, 16)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (2, 16)

    clone = Embedding.from_config(config)
    clone.build()
    assert (clone.lora_rank, clone.lora_alpha) == (2, 16)
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    revived.build()
    assert type(revived) is Embedding
    assert (revived.lora_rank, revived.lora_alpha) == (2, 16)


def test_constructor_alpha_is_kept_where_keras_3_15_dropped_it(rng):
    theirs = keras.layers.Embedding(VOCAB, DIM, lora_rank=2, lora_alpha=16)
    ours = Embedding(VOCAB, DIM, lora_rank=2, lora_alpha=16)
    theirs.build()
    ours.build()
    # Keras 3.15's build calls enable_lora(rank), which replaces the alpha by
    # the rank; later Keras keeps it, as ours does on every version.
    assert theirs.lora_alpha in (2, 16)
    assert theirs.get_config()["lora_alpha"] == theirs.lora_alpha
    assert ours.lora_alpha == 16
    assert ours.get_config()["lora_alpha"] == 16
    # The scale that reaches the output: 16 / 2 = 8 for ours.
    ours.lora_embeddings_b.assign(rng.normal(size=(2, DIM)).astype("float32"))
    ids = np.array([3, 7, 11])
    np.testing.assert_allclose(
        numpy_of(ours(ids)), lora_reference(ours, ids), rtol=1e-5, atol=1e-5
    )
    scale_one = numpy_of(ours._embeddings)[ids] + (
        numpy_of(ours.lora_embeddings_a)[ids] @ numpy_of(ours.lora_embeddings_b)
    )
    assert not np.allclose(numpy_of(ours(ids)), scale_one, atol=1e-3)
    if theirs.lora_alpha == 16:
        # The same scale as Keras's layer, given the same variables.
        for mine, keras_variable in zip(ours.weights, theirs.weights, strict=True):
            assert mine.name == keras_variable.name
            keras_variable.assign(mine)
        np.testing.assert_allclose(
            numpy_of(theirs(ids)), numpy_of(ours(ids)), rtol=1e-5, atol=1e-5
        )


def test_enable_lora_alpha_defaults_to_rank_and_appears_in_config():
    layer = built()
    assert "lora_rank" not in layer.get_config()
    assert "lora_alpha" not in layer.get_config()
    layer.enable_lora(4)
    assert (layer.lora_rank, layer.lora_alpha) == (4, 4)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (4, 4)


def test_constructor_weights_with_lora(rng):
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    layer = Embedding(VOCAB, DIM, weights=[table], lora_rank=2, lora_alpha=5)
    assert layer.lora_enabled
    np.testing.assert_array_equal(raw(layer._embeddings), table)
    # B starts at zero: the output is the given table.
    np.testing.assert_array_equal(raw(layer(np.arange(VOCAB))), table)


# Variables.


@pytest.mark.parametrize(
    ("dtype", "table_dtype", "output_dtype"),
    [
        ("float32", "float32", "float32"),
        ("mixed_float16", "float32", "float16"),
        ("mixed_bfloat16", "float32", "bfloat16"),
        ("bfloat16", "bfloat16", "bfloat16"),
    ],
)
@pytest.mark.parametrize("how", ["constructor", "enable_lora"])
def test_lora_variables(dtype, table_dtype, output_dtype, how, rng):
    if how == "constructor":
        layer = built(lora_rank=3, dtype=dtype)
    else:
        layer = built(dtype=dtype)
        layer.enable_lora(3)
    assert [v.name for v in layer.weights] == ["embeddings", *LORA_WEIGHTS]
    assert [v.name for v in layer.trainable_weights] == LORA_WEIGHTS
    assert [v.name for v in layer.non_trainable_weights] == ["embeddings"]
    assert [v.trainable for v in layer.weights] == [False, True, True]
    assert [dtype_of(v) for v in layer.weights] == [table_dtype, "float32", "float32"]
    assert [tuple(v.shape) for v in layer.weights] == [
        (VOCAB, DIM),
        (VOCAB, 3),
        (3, DIM),
    ]
    # A from its initializer, B at zero: the delta starts at zero.
    assert np.any(raw(layer.lora_embeddings_a))
    assert not np.any(raw(layer.lora_embeddings_b))
    ids = rng.integers(0, VOCAB, size=(2, 5))
    out = layer(ids)
    assert dtype_of(out) == output_dtype
    # B at zero: the table rows, rounded once to the output dtype.
    table = numpy_of(ops.cast(layer._embeddings, output_dtype))
    np.testing.assert_array_equal(numpy_of(out), table[ids])


def test_lora_variables_under_global_mixed_float16(mixed_float16_policy, rng):
    layer = built(lora_rank=3)
    assert layer.dtype_policy.name == "mixed_float16"
    assert [dtype_of(v) for v in layer.weights] == ["float32"] * 3
    assert [v.name for v in layer.trainable_weights] == LORA_WEIGHTS
    randomize_adapters(layer, rng)
    ids = rng.integers(0, VOCAB, size=(3, 4))
    out = layer(ids)
    assert dtype_of(out) == "float16"
    # float32 sum, rounded once to float16.
    expected = lora_reference(layer, ids).astype("float16").astype("float64")
    np.testing.assert_allclose(numpy_of(out), expected, rtol=1e-3, atol=1e-3)


# The forward pass.


@pytest.mark.parametrize("shape", [(), (7,), (4, 7), (2, 3, 5)])
def test_forward_equals_numpy_reference(shape, rng):
    layer = built(lora_rank=3, lora_alpha=6)
    randomize_adapters(layer, rng)
    ids = rng.integers(0, VOCAB, size=shape)
    out = layer(ids)
    assert tuple(out.shape) == (*shape, DIM)
    np.testing.assert_allclose(
        numpy_of(out), lora_reference(layer, ids), rtol=1e-5, atol=1e-5
    )


def test_forward_in_compiled_predict_equals_numpy_reference(rng):
    layer = Embedding(VOCAB, DIM, lora_rank=3, lora_alpha=6, name="tokens")
    model = keras.Sequential([keras.Input((7,), dtype="int32"), layer])
    randomize_adapters(layer, rng)
    ids = rng.integers(0, VOCAB, size=(4, 7))
    np.testing.assert_allclose(
        model.predict(ids, verbose=0), lora_reference(layer, ids), rtol=1e-5, atol=1e-5
    )


def test_forward_equals_keras_lora(rng):
    ours, theirs = built(), keras.layers.Embedding(VOCAB, DIM)
    theirs.build()
    # Keras's build would drop a constructor alpha; enable_lora keeps it.
    ours.enable_lora(3, lora_alpha=6)
    theirs.enable_lora(3, lora_alpha=6)
    randomize_adapters(ours, rng)
    theirs.set_weights(ours.get_weights())
    ids = rng.integers(0, VOCAB, size=(3, 4))
    np.testing.assert_allclose(
        numpy_of(ours(ids)), numpy_of(theirs(ids)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        numpy_of(ours.embeddings), numpy_of(theirs.embeddings), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    ("dtype", "merged_dtype"),
    [("float32", "float32"), ("mixed_float16", "float16")],
)
def test_embeddings_property_is_merged_table(dtype, merged_dtype, rng):
    layer = built(lora_rank=2, lora_alpha=5, dtype=dtype)
    randomize_adapters(layer, rng)
    merged = layer.embeddings
    assert dtype_of(merged) == merged_dtype
    tolerance = 1e-5 if merged_dtype == "float32" else 3e-3
    np.testing.assert_allclose(
        numpy_of(merged), merged_reference(layer), rtol=tolerance, atol=tolerance
    )
    # The stored table itself is untouched.
    assert not np.allclose(numpy_of(layer._embeddings), merged_reference(layer))


# Training.


def test_lora_training_lowers_loss_and_freezes_table(rng):
    layer = Embedding(VOCAB, DIM, name="tokens")
    model = pooled_model(layer)
    layer.enable_lora(4, lora_alpha=8)
    model.get_layer("head").trainable = False
    model.compile(keras.optimizers.Adam(0.02), "mse")
    assert [v.name for v in model.trainable_weights] == LORA_WEIGHTS
    ids, y = toy_task(rng)
    table = raw(layer._embeddings)
    b_before = raw(layer.lora_embeddings_b)
    history = model.fit(ids, y, epochs=12, batch_size=16, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(raw(layer._embeddings), table)
    assert not np.array_equal(raw(layer.lora_embeddings_b), b_before)


def test_sgd_step_updates_only_looked_up_rows_of_a(rng):
    layer = Embedding(VOCAB, DIM, lora_rank=3, lora_alpha=6, name="tokens")
    model = pooled_model(layer)
    # With B at zero the gradient wrt A is zero everywhere; start B elsewhere.
    layer.lora_embeddings_b.assign(rng.normal(size=(3, DIM)).astype("float32"))
    model.compile(keras.optimizers.SGD(0.5), "mse")
    ids, y = toy_task(rng, n=16, seen=VOCAB // 2)
    table, a_before = raw(layer._embeddings), raw(layer.lora_embeddings_a)
    model.fit(ids, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    a_after = raw(layer.lora_embeddings_a)
    seen = np.unique(ids)
    unseen = np.setdiff1d(np.arange(VOCAB), seen)
    assert len(unseen) >= VOCAB // 2
    np.testing.assert_array_equal(a_after[unseen], a_before[unseen])
    assert np.all(np.any(a_after[seen] != a_before[seen], axis=1))
    np.testing.assert_array_equal(raw(layer._embeddings), table)


# merge_lora.


def test_merge_lora(rng):
    layer = Embedding(VOCAB, DIM, lora_rank=2, lora_alpha=5, name="tokens")
    model = pooled_model(layer)
    ids, y = toy_task(rng)
    randomize_adapters(layer, rng)
    expected_table = merged_reference(layer)
    before_eager = numpy_of(layer(ids))
    # Predict before merging: on TensorFlow this traces a function that has
    # captured the adapters, and it is reused after the merge.
    before = model.predict(ids, verbose=0)

    layer.merge_lora()

    assert not layer.lora_enabled
    assert (layer.lora_rank, layer.lora_alpha) == (None, None)
    assert not hasattr(layer, "lora_embeddings_a")
    assert [v.name for v in layer.weights] == ["embeddings"]
    assert [v.name for v in layer.trainable_weights] == ["embeddings"]
    assert layer._embeddings.trainable
    assert "embeddings" in [v.name for v in model.trainable_weights]
    config = layer.get_config()
    assert "lora_rank" not in config
    assert "lora_alpha" not in config
    np.testing.assert_allclose(
        numpy_of(layer._embeddings), expected_table, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(numpy_of(layer(ids)), before_eager, atol=1e-5)
    np.testing.assert_allclose(
        model.predict(ids, verbose=0), before, rtol=1e-5, atol=1e-5
    )

    # The merged model can be recompiled and trained: the table moves now.
    model.compile(keras.optimizers.SGD(0.5), "mse")
    table = raw(layer._embeddings)
    history = model.fit(ids, y, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(raw(layer._embeddings), table)


def test_merge_lora_without_lora():
    layer = Embedding(10, 4, name="plain")
    layer.build()
    with pytest.raises(ValueError, match="Layer 'plain' has no LoRA adapters to merge"):
        layer.merge_lora()
    layer.enable_lora(2)
    layer.merge_lora()
    with pytest.raises(ValueError, match="has no LoRA adapters to merge"):
        layer.merge_lora()


def test_lora_can_be_enabled_again_after_merge(rng):
    layer = built(lora_rank=2)
    randomize_adapters(layer, rng)
    layer.merge_lora()
    merged = raw(layer._embeddings)
    layer.enable_lora(3, lora_alpha=1)
    assert [v.name for v in layer.weights] == ["embeddings", *LORA_WEIGHTS]
    assert (layer.lora_rank, layer.lora_alpha) == (3, 1)
    ids = np.arange(VOCAB)
    np.testing.assert_array_equal(raw(layer(ids)), merged)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [("bfloat16", 2e-2), ("mixed_float16", 1e-5)]
)
def test_merge_lora_keeps_table_dtype(dtype, tolerance, rng):
    layer = built(lora_rank=2, dtype=dtype)
    table_dtype = dtype_of(layer._embeddings)
    randomize_adapters(layer, rng)
    expected = merged_reference(layer)
    layer.merge_lora()
    assert dtype_of(layer._embeddings) == table_dtype
    np.testing.assert_allclose(
        numpy_of(layer._embeddings), expected, rtol=tolerance, atol=tolerance
    )


# Invalid ids with LoRA behave as without.


def test_invalid_id_with_lora_raises_eagerly():
    layer = Embedding(10, 4, lora_rank=2, name="tokens")
    with pytest.raises(InvalidIdError) as info:
        layer(np.array([[1, 2], [3, 10]]))
    message = str(info.value)
    assert "Layer 'tokens' received an invalid id 10 at position (1, 1)" in message
    assert "Ids must be whole numbers in [0, 9] (input_dim=10)" in message
    with pytest.raises(InvalidIdError, match="invalid id -1 at position"):
        layer(ops.convert_to_tensor([0, -1]))


def test_invalid_id_with_lora_in_model_predict(rng):
    layer = Embedding(10, 4, lora_rank=2, name="tokens")
    model = keras.Sequential([keras.Input((3,), dtype="int32"), layer])
    randomize_adapters(layer, rng)
    ids = np.array([[1, 10, -3]])
    if BACKEND == "torch":  # Keras runs predict eagerly on PyTorch.
        with pytest.raises(InvalidIdError, match="invalid id 10 at position"):
            model.predict(ids, verbose=0)
        return
    out = model.predict(ids, verbose=0)
    np.testing.assert_allclose(
        out[0, 0], lora_reference(layer, [1])[0], rtol=1e-5, atol=1e-5
    )
    # The delta is zeroed too: row 0 of A @ B would not be zero.
    np.testing.assert_array_equal(out[0, 1:], np.zeros((2, 4)))


def test_invalid_ids_zeros_with_lora(rng):
    layer = Embedding(10, 4, lora_rank=2, invalid_ids="zeros")
    layer.build()
    randomize_adapters(layer, rng)
    out = numpy_of(layer(np.array([3, 10, -1, 0])))
    np.testing.assert_allclose(
        out[[0, 3]], lora_reference(layer, [3, 0]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(out[1:3], np.zeros((2, 4)))

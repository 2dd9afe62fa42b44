"""Quantized tables: Keras parity, lookups against a NumPy reference, error
bounds, LoRA on a quantized table, invalid ids, and Keras's error paths."""

import keras
import numpy as np
import pytest
from keras import ops
from quantization_reference import (
    CONFIG_IDS,
    CONFIGS,
    config_for,
    dequantized_table,
    raw,
    step_sizes,
)

from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
VOCAB = 64
IDS = np.array([[1, 2, 3, 0], [7, 7, 63, 4], [12, 30, 30, 5]], dtype="int32")


def numpy_of(x):
    return ops.convert_to_numpy(ops.cast(x, "float32")).astype("float64")


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def straddling_table(rng, vocab, dim):
    """Random values of alternating sign along each row, at least 0.1 away
    from zero: every int4 group holds both signs (or is padded with zeros),
    where our grouped quantization is Keras's bit for bit."""
    signs = np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
    magnitudes = 0.1 + np.abs(rng.normal(scale=0.5, size=(vocab, dim)))
    return (magnitudes * signs).astype("float32")


def pair(dim, rng, vocab=VOCAB, **kwargs):
    """Our layer and Keras's, built, with the same random float table."""
    ours = Embedding(vocab, dim, **kwargs)
    theirs = keras.layers.Embedding(vocab, dim, **kwargs)
    ours.build()
    theirs.build()
    table = straddling_table(rng, vocab, dim)
    ours.embeddings.assign(table)
    theirs.embeddings.assign(table)
    return ours, theirs, table


def quantized(dim, mode, block_size, rng, **kwargs):
    layer = Embedding(VOCAB, dim, **kwargs)
    layer.build()
    table = rng.normal(scale=0.5, size=(VOCAB, dim)).astype("float32")
    layer.embeddings.assign(table)
    layer.quantize(mode, config=config_for(mode, block_size))
    return layer, table


# Parity with keras.layers.Embedding.


@pytest.mark.parametrize("dim", [13, 16])
@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_quantize_matches_keras_variables_policy_and_outputs(
    mode, block_size, dim, rng
):
    ours, theirs, _ = pair(dim, rng)
    ours.quantize(mode, config=config_for(mode, block_size))
    theirs.quantize(mode, config=config_for(mode, block_size))
    assert ours.dtype_policy.name == theirs.dtype_policy.name
    assert ours.quantization_mode == mode
    assert [(v.name, tuple(v.shape), dtype_of(v)) for v in ours.weights] == [
        (v.name, tuple(v.shape), dtype_of(v)) for v in theirs.weights
    ]
    for mine, keras_variable in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(raw(mine), raw(keras_variable), err_msg=mine.name)
    assert ours.trainable_weights == []
    # Within one unit in the last place: for one scale per row, ours
    # multiplies by the inverse scale on every backend (what XLA makes of
    # Keras's division), so that all backends give the same bits.
    np.testing.assert_array_max_ulp(
        ops.convert_to_numpy(ours(IDS)), ops.convert_to_numpy(theirs(IDS)), maxulp=1
    )
    np.testing.assert_array_equal(raw(ours.embeddings), raw(theirs.embeddings))


def test_default_int4_is_groups_of_128_like_keras(rng):
    layer, _ = quantized(300, "int4", "default", rng)
    assert layer.dtype_policy.name == "int4/128_from_float32"
    assert [tuple(v.shape) for v in layer.weights] == [
        (VOCAB, 150),
        (VOCAB, 3),
        (VOCAB, 3),
        (300,),
    ]
    np.testing.assert_array_equal(raw(layer.g_idx), np.arange(300) // 128)


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 2), (0, 4)])
def test_lookup_equals_numpy_reference(mode, block_size, shape, rng):
    layer, _ = quantized(13, mode, block_size, rng)
    ids = rng.integers(0, VOCAB, size=shape)
    out = layer(ids)
    assert tuple(out.shape) == (*shape, 13)
    assert dtype_of(out) == "float32"
    np.testing.assert_allclose(
        numpy_of(out), dequantized_table(layer)[ids], rtol=1e-6, atol=1e-7
    )
    # The same rows through a backend tensor and under Model.predict.
    tensor_ids = ops.convert_to_tensor(ids.astype("int32"))
    np.testing.assert_array_equal(numpy_of(layer(tensor_ids)), numpy_of(out))
    if ids.ndim == 2 and ids.size:
        model = keras.Sequential([keras.Input(shape[1:], dtype="int32"), layer])
        np.testing.assert_array_equal(model.predict(ids, verbose=0), numpy_of(out))


@pytest.mark.parametrize("block_size", [1, 4, 5, 16, 128])
def test_every_int4_group_layout_equals_numpy_reference(block_size, rng):
    """Groups of one value, whole groups, a partial last group, one group."""
    layer = Embedding(VOCAB, 16)
    layer.build()
    layer.embeddings.assign(rng.normal(size=(VOCAB, 16)).astype("float32"))
    layer.quantize(
        "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    )
    ids = rng.integers(0, VOCAB, size=(2, 3, 4))
    expected = dequantized_table(layer)[ids]
    np.testing.assert_allclose(numpy_of(layer(ids)), expected, rtol=1e-6, atol=1e-7)
    # A model whose batch size and sequence length are unknown when traced.
    model = keras.Sequential([keras.Input((None,), dtype="int32"), layer])
    np.testing.assert_allclose(
        model.predict(ids[0], verbose=0), expected[0], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("values", ["normal", "positive", "one_value_groups"])
def test_error_against_float_table_is_half_a_step(mode, block_size, values, rng):
    table = rng.normal(scale=0.5, size=(VOCAB, 13)).astype("float32")
    if values == "positive":
        table = np.abs(table) + 0.5
    layer = Embedding(VOCAB, 13, weights=table)
    config = config_for(mode, block_size)
    if values == "one_value_groups" and mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=1)
    layer.quantize(mode, config=config)
    error = np.abs(numpy_of(layer(np.arange(VOCAB))) - table)
    # Half a step, plus float32 rounding of the dequantized value.
    assert (error <= 0.5 * step_sizes(layer) + 1e-6).all()


def test_grouped_int4_keeps_one_sign_groups_in_keras_format(rng):
    """Keras 3.15 clips a group's zero point to [-8, 7]: a group of positive
    values far from zero comes back wrong by most of its magnitude. Ours widens
    the group's range to zero, in the same format, which Keras reads correctly.
    Later Keras (3.16 nightlies) widens it too: there both quantize to
    the same bits."""
    table = (2.0 + rng.uniform(size=(VOCAB, 16))).astype("float32")
    config = keras.quantizers.Int4QuantizationConfig(block_size=4)
    ours = Embedding(VOCAB, 16, weights=table)
    theirs = keras.layers.Embedding(VOCAB, 16, weights=table)
    ours.quantize("int4", config=config)
    theirs.quantize("int4", config=config)
    keras_error = np.abs(numpy_of(theirs(np.arange(VOCAB))) - table).max()
    our_error = np.abs(numpy_of(ours(np.arange(VOCAB))) - table).max()
    assert our_error < 3.0 / 15
    if keras_error < 3.0 / 15:
        # The installed Keras widens the groups as ours does.
        for mine, keras_variable in zip(ours.weights, theirs.weights, strict=True):
            np.testing.assert_array_equal(raw(mine), raw(keras_variable))
    else:
        assert keras_error > 1.0
    # Keras's layer, given our quantized table, reads the same rows as ours.
    for mine, keras_variable in zip(ours.weights, theirs.weights, strict=True):
        keras_variable.assign(mine)
    np.testing.assert_array_equal(numpy_of(theirs(IDS)), numpy_of(ours(IDS)))


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_mean_squared_error_with_default_initializer(mode, block_size):
    layer = Embedding(1000, 64)
    layer.build()
    table = numpy_of(layer.embeddings)
    layer.quantize(mode, config=config_for(mode, block_size))
    mse = np.mean((numpy_of(layer(np.arange(1000))) - table) ** 2)
    assert mse < 1e-3
    assert mse > 0  # A quantized table differs from the float one.


def test_int8_scale_is_per_row_absmax(rng):
    layer, table = quantized(16, "int8", None, rng)
    expected_scale = 127 / (np.abs(table).max(axis=1) + keras.backend.epsilon())
    np.testing.assert_allclose(raw(layer.embeddings_scale), expected_scale, rtol=1e-6)
    assert np.abs(raw(layer._embeddings)).max(axis=1).tolist() == [127] * VOCAB


# Dtype policies and configs.


@pytest.mark.parametrize(
    ("policy", "shapes"),
    [
        ("int8_from_float32", [(VOCAB, 13), (VOCAB,)]),
        ("int4_from_float32", [(VOCAB, 7), (VOCAB,)]),
        ("int4/-1_from_float32", [(VOCAB, 7), (VOCAB,)]),
        ("int4/4_from_float32", [(VOCAB, 7), (VOCAB, 4), (VOCAB, 4), (13,)]),
    ],
)
def test_quantized_policy_at_construction_builds_keras_variables(policy, shapes):
    ours = Embedding(VOCAB, 13, dtype=policy)
    theirs = keras.layers.Embedding(VOCAB, 13, dtype=policy)
    ours.build()
    theirs.build()
    assert [tuple(v.shape) for v in ours.weights] == shapes
    assert [(v.name, tuple(v.shape), dtype_of(v)) for v in ours.weights] == [
        (v.name, tuple(v.shape), dtype_of(v)) for v in theirs.weights
    ]
    assert ours.dtype_policy.name == policy
    assert ours.quantization_mode == policy[:4]


def test_from_config_takes_a_config_object_or_its_serialization():
    config = keras.quantizers.Int4QuantizationConfig(block_size=4)
    base = Embedding(VOCAB, 13).get_config()
    for value in (config, keras.saving.serialize_keras_object(config)):
        layer = Embedding.from_config({**base, "quantization_config": value})
        assert isinstance(layer.quantization_config, type(config))
        assert layer.quantization_config.block_size == 4


def test_construction_config_sets_block_size(rng):
    config = keras.quantizers.Int4QuantizationConfig(block_size=4)
    layer = Embedding(VOCAB, 13, dtype="int4_from_float32", quantization_config=config)
    layer.build()
    assert tuple(layer.embeddings_scale.shape) == (VOCAB, 4)
    serialized = layer.get_config()["quantization_config"]
    assert serialized["class_name"] == "Int4QuantizationConfig"
    assert serialized["config"]["block_size"] == 4
    clone = Embedding.from_config(layer.get_config())
    assert clone.quantization_config.block_size == 4
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("policy", ["int8_from_float32", "int4/4_from_float32"])
def test_weights_argument_is_quantized(policy, rng):
    table = rng.normal(size=(VOCAB, 13)).astype("float32")
    layer = Embedding(VOCAB, 13, dtype=policy, weights=table)
    reference = Embedding(VOCAB, 13, weights=table)
    reference.quantize(policy[:4], config=layer._default_config(policy[:4]))
    for mine, expected in zip(layer.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(raw(mine), raw(expected), err_msg=mine.name)


def test_mixed_bfloat16_policy_gives_bfloat16_rows(rng):
    layer = Embedding(VOCAB, 13, dtype="mixed_bfloat16")
    layer.build()
    table = rng.normal(size=(VOCAB, 13)).astype("float32")
    layer.embeddings.assign(table)
    layer.quantize("int8")
    assert layer.dtype_policy.name == "int8_from_mixed_bfloat16"
    assert dtype_of(layer.embeddings_scale) == "float32"
    out = layer(IDS)
    assert dtype_of(out) == "bfloat16"
    # Dequantized in float32 with the float32 scales, rounded to bfloat16
    # once: Keras's autocasting would round the scales to bfloat16 first.
    values = raw(layer._embeddings).astype("float32")
    scale = raw(layer.embeddings_scale)
    rows = (values * np.float32(0.5)) * (np.float32(2) / scale)[:, None]
    expected = numpy_of(ops.cast(rows[IDS], "bfloat16"))
    np.testing.assert_array_equal(numpy_of(out), expected)
    np.testing.assert_allclose(
        numpy_of(out), dequantized_table(layer)[IDS], rtol=2**-8, atol=0
    )


def test_custom_weight_quantizer(rng):
    quantizer = keras.quantizers.AbsMaxQuantizer(axis=-1, value_range=(-100, 100))
    config = keras.quantizers.Int8QuantizationConfig(weight_quantizer=quantizer)
    layer, table = quantized(13, "int8", None, rng)
    other = Embedding(VOCAB, 13, weights=table)
    other.quantize("int8", config=config)
    assert np.abs(raw(other._embeddings)).max() == 100
    np.testing.assert_allclose(
        raw(other.embeddings_scale), 100 / (np.abs(table).max(axis=1) + 1e-7), rtol=1e-6
    )
    assert layer.quantization_config.weight_quantizer is None


def test_weight_quantizer_must_give_one_scale_per_row(rng):
    quantizer = keras.quantizers.AbsMaxQuantizer(axis=0)
    config = keras.quantizers.Int8QuantizationConfig(weight_quantizer=quantizer)
    layer = Embedding(VOCAB, 13)
    layer.build()
    with pytest.raises(ValueError, match=r"one scale per row, \(64, 1\)\. Use a"):
        layer.quantize("int8", config=config)
    assert layer.quantization_mode is None
    assert [v.name for v in layer.weights] == ["embeddings"]


def test_dtype_policy_setter_quantizes_with_the_policy_block_size(rng):
    layer = Embedding(VOCAB, 13)
    layer.build()
    layer.dtype_policy = "int4/4_from_float32"
    # Keras 3.15 would quantize with its default block of 128 here, leaving
    # variables that a reload (built from the policy) cannot take; later
    # Keras takes the policy's, as ours.
    assert dtype_of(layer._embeddings) == "int8"
    assert tuple(layer._embeddings.shape) == (VOCAB, 7)
    assert tuple(layer.embeddings_scale.shape) == (VOCAB, 4)
    clone = Embedding.from_config(layer.get_config())
    clone.build()
    assert [tuple(v.shape) for v in clone.weights] == [
        tuple(v.shape) for v in layer.weights
    ]


# Keras 3.15 warns that the model's InputLayer has no quantize method.
@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_model_quantize_quantizes_our_layer(mode, rng):
    """`Model.quantize` quantizes our table as it quantizes Keras's: the same
    policy and variables (int8 values, two int4 values a byte)."""
    model, keras_model = models = [
        keras.Sequential([keras.Input((4,), dtype="int32"), layer_class(VOCAB, 16)])
        for layer_class in (Embedding, keras.layers.Embedding)
    ]
    keras_model.layers[0].embeddings.assign(numpy_of(model.layers[0].embeddings))
    before = model.predict(IDS, verbose=0)
    for each in models:
        each.quantize(mode)
    layer, keras_layer = (each.layers[0] for each in models)
    policy = "int8_from_float32" if mode == "int8" else "int4/128_from_float32"
    assert layer.dtype_policy.name == keras_layer.dtype_policy.name == policy
    assert dtype_of(layer._embeddings) == "int8"
    assert [(v.name, tuple(v.shape), dtype_of(v)) for v in layer.weights] == [
        (v.name, tuple(v.shape), dtype_of(v)) for v in keras_layer.weights
    ]
    after = model.predict(IDS, verbose=0)
    np.testing.assert_allclose(after, before, atol=0.02)
    assert not np.array_equal(after, before)


def test_masking_is_unchanged_by_quantization(rng):
    layer, _ = quantized(13, "int4", 5, rng, mask_zero=True)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.compute_mask(IDS)), IDS != 0
    )


# LoRA on a quantized table.


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("order", ["lora_first", "quantize_first"])
def test_lora_forward_equals_reference(mode, block_size, order, rng):
    layer = Embedding(VOCAB, 13)
    layer.build()
    if order == "lora_first":
        layer.enable_lora(3, lora_alpha=6.0)
    layer.quantize(mode, config=config_for(mode, block_size))
    if order == "quantize_first":
        layer.enable_lora(3, lora_alpha=6.0)
    assert [v.name for v in layer.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    layer.lora_embeddings_b.assign(rng.normal(size=(3, 13)).astype("float32"))
    a, b = raw(layer.lora_embeddings_a), raw(layer.lora_embeddings_b)
    expected = dequantized_table(layer)[IDS] + 2.0 * (a[IDS] @ b)
    np.testing.assert_allclose(numpy_of(layer(IDS)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_lora_training_on_quantized_table_lowers_loss_base_untouched(
    mode, block_size, rng
):
    layer, _ = quantized(16, mode, block_size, rng)
    layer.enable_lora(4)
    base = [raw(v) for v in layer.non_trainable_weights]
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            layer,
            keras.layers.GlobalAveragePooling1D(),
        ]
    )
    targets = rng.normal(size=(3, 16)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(IDS, targets, epochs=20, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    for variable, before in zip(layer.non_trainable_weights, base, strict=True):
        np.testing.assert_array_equal(raw(variable), before, err_msg=variable.name)


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_merge_lora_requantizes_like_keras_saving(mode, block_size, rng):
    """Keras merges and re-quantizes when it saves a quantized LoRA layer;
    our merge_lora gives the same quantized table."""
    ours, theirs, _ = pair(13, rng)
    for layer in (ours, theirs):
        layer.quantize(mode, config=config_for(mode, block_size))
        layer.enable_lora(2, lora_alpha=4.0)
    a = rng.normal(size=(VOCAB, 2)).astype("float32")
    # A delta too small to flip a value's sign keeps every int4 group
    # straddling zero, where Keras's re-quantization is ours.
    b = rng.normal(scale=0.01, size=(2, 13)).astype("float32")
    for layer in (ours, theirs):
        layer.lora_embeddings_a.assign(a)
        layer.lora_embeddings_b.assign(b)
    before = numpy_of(ours(IDS))
    ours.merge_lora()
    keras_store = {}
    theirs.save_own_variables(keras_store)
    assert not ours.lora_enabled
    assert [v.name for v in ours.trainable_weights] == []
    assert ours.quantization_mode == mode
    for index, variable in enumerate(ours.weights):
        np.testing.assert_allclose(
            raw(variable).astype("float64"),
            np.asarray(keras_store[str(index)]).astype("float64"),
            atol=0 if variable.dtype == "int8" else 1e-5,
            err_msg=variable.name,
        )
    after = numpy_of(ours(IDS))
    # Re-quantizing moves each value by at most half a step.
    assert (np.abs(after - before) <= 0.5 * step_sizes(ours)[IDS] + 1e-5).all()


def test_enable_lora_on_quantized_layer_then_quantize_again_is_refused(rng):
    layer, _ = quantized(13, "int8", None, rng)
    layer.enable_lora(2)
    with pytest.raises(ValueError, match="is already quantized"):
        layer.quantize("int4")


# Invalid ids: as in the float path.


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_invalid_id_raises_eagerly(mode, block_size, bad, rng):
    layer, _ = quantized(13, mode, block_size, rng)
    ids = IDS.copy()
    ids[1, 2] = bad
    with pytest.raises(InvalidIdError, match=rf"invalid id {bad} at position \(1, 2\)"):
        layer(ids)
    with pytest.raises(InvalidIdError, match=rf"invalid id {bad} at position \(1, 2\)"):
        layer(ops.convert_to_tensor(ids))


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_invalid_ids_zeros_mode_gives_zero_rows(mode, block_size, rng):
    layer, _ = quantized(13, mode, block_size, rng, invalid_ids="zeros")
    layer.enable_lora(2)
    layer.lora_embeddings_b.assign(np.ones((2, 13), dtype="float32"))
    ids = IDS.copy()
    ids[0, 1], ids[2, 3] = VOCAB + 5, -3
    out = numpy_of(layer(ids))
    assert not out[0, 1].any() and not out[2, 3].any()
    good = numpy_of(layer(IDS))
    mask = np.ones(ids.shape, dtype=bool)
    mask[0, 1] = mask[2, 3] = False
    np.testing.assert_array_equal(out[mask], good[mask])


@pytest.mark.skipif(BACKEND == "torch", reason="predict runs eagerly on PyTorch")
@pytest.mark.parametrize(("mode", "block_size"), CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_invalid_ids_in_compiled_predict_give_zero_rows(mode, block_size, rng):
    layer, _ = quantized(13, mode, block_size, rng)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    ids = IDS.copy()
    ids[1, 0] = VOCAB
    out = model.predict(ids, verbose=0)
    assert not out[1, 0].any()
    np.testing.assert_array_equal(out[0], numpy_of(layer(IDS[:1]))[0])


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_invalid_ids_under_jax_jit_give_zero_rows(rng):
    import jax

    layer, _ = quantized(13, "int4", 5, rng)

    @jax.jit
    def lookup(non_trainable, ids):
        return layer.stateless_call([], non_trainable, ids)[0]

    ids = IDS.copy()
    ids[2, 2] = -1
    values = [v.value for v in layer.non_trainable_variables]
    out = np.asarray(lookup(values, ids))
    assert not out[2, 2].any()
    np.testing.assert_array_equal(out[0], numpy_of(layer(IDS))[0])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_ragged_ids_on_quantized_table(rng):
    import tensorflow as tf

    layer, _ = quantized(13, "int4", None, rng)
    ragged = tf.ragged.constant([[1, 2, 3], [4], [5, 6]])
    out = layer(ragged)
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_allclose(
        out.flat_values.numpy(),
        dequantized_table(layer)[[1, 2, 3, 4, 5, 6]],
        rtol=1e-6,
        atol=1e-7,
    )


# Keras's errors.


def both_errors(action):
    """The error `action(layer)` raises for our layer and for Keras's."""
    errors = []
    for layer_class in (Embedding, keras.layers.Embedding):
        layer = layer_class(VOCAB, 8, name="table")
        with pytest.raises(Exception) as info:
            action(layer)
        errors.append(info.value)
    return errors


@pytest.mark.parametrize(
    ("action", "error_type", "fragment"),
    [
        (lambda layer: layer.quantize("int8"), ValueError, "isn't yet built"),
        (
            lambda layer: (
                layer.build(),
                layer.quantize("int8"),
                layer.quantize("int4"),
            ),
            ValueError,
            "is already quantized with dtype_policy='int8_from_float32'",
        ),
        (
            lambda layer: (layer.build(), layer.quantize("int16")),
            ValueError,
            "Invalid quantization mode",
        ),
        (
            lambda layer: (layer.build(), layer.quantize("float8")),
            NotImplementedError,
            "Expected one of ('int8', 'int4'). Received: quantization_mode=float8",
        ),
        (
            lambda layer: (layer.build(), layer.quantize()),
            ValueError,
            "You must provide either `mode` or `config`",
        ),
        (
            lambda layer: (
                layer.build(),
                layer.quantize(
                    "int8", config=keras.quantizers.Int4QuantizationConfig()
                ),
            ),
            ValueError,
            "Contradictory arguments",
        ),
    ],
    ids=["unbuilt", "twice", "invalid", "float8", "no-mode", "contradictory"],
)
def test_quantize_errors_match_keras(action, error_type, fragment):
    ours, theirs = both_errors(action)
    assert type(ours) is type(theirs) is error_type
    assert str(ours) == str(theirs)
    assert fragment in str(ours)


@pytest.mark.parametrize("mode", ["int7", "float7"])
def test_invalid_mode_errors_match_keras(mode):
    """Keras's own test (embedding_test.test_quantize_invalid_mode), run on
    both layers: quantize, quantized_build and quantized_call refuse the mode
    with the same error and leave the dtype policy as it was."""
    ids = np.random.randint(0, 9, size=(1, 3))
    messages = []
    for layer_class in (Embedding, keras.layers.Embedding):
        layer = layer_class(10, 16)
        layer.build()
        original_dtype_policy = layer.dtype_policy
        with pytest.raises(ValueError, match="Invalid quantization mode") as quantize:
            layer.quantize(mode)
        assert layer.dtype_policy == original_dtype_policy
        with pytest.raises(NotImplementedError, match="Invalid quantization mode"):
            layer.quantized_build((None, 2), mode)
        assert layer.dtype_policy == original_dtype_policy
        # A policy naming an unknown mode, as Keras's test sets it.
        layer._dtype_policy._quantization_mode = mode
        with pytest.raises(NotImplementedError) as call:
            layer.quantized_call(ids)
        # Through __call__ too: Keras routes the layer to quantized_call.
        with pytest.raises(NotImplementedError) as dunder_call:
            layer(ids)
        layer._dtype_policy._quantization_mode = None
        assert layer.dtype_policy == original_dtype_policy
        assert str(call.value) == (
            "Invalid quantization mode. Expected one of ('int8', 'int4'). "
            f"Received: quantization_mode={mode}"
        )
        assert str(call.value) in str(dunder_call.value)
        messages.append((str(quantize.value), str(call.value)))
    assert messages[0] == messages[1]


def test_quantized_build_refuses_another_table_shape():
    layer = Embedding(VOCAB, 8, name="table")
    with pytest.raises(ValueError) as info:
        layer.quantized_build((VOCAB + 1, 8), "int8")
    assert str(info.value) == (
        f"Layer 'table' has a table of shape ({VOCAB}, 8) (input_dim, "
        "output_dim) and cannot build quantized variables for "
        f"embeddings_shape=({VOCAB + 1}, 8)."
    )
    assert layer.weights == []


def test_int8_with_float16_compute_is_refused_like_keras():
    def action(layer):
        layer.dtype_policy = "mixed_float16"
        layer.build()
        layer.quantize("int8")

    ours, theirs = both_errors(action)
    assert type(ours) is type(theirs) is ValueError
    assert str(ours) == str(theirs)
    assert "doesn't work well with compute_dtype='float16'" in str(ours)


def test_refused_policy_leaves_layer_as_it_was(rng):
    layer = Embedding(VOCAB, 8)
    layer.build()
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        layer.dtype_policy = "int8_from_mixed_float16"
    # Keras keeps the quantized policy over a float table here.
    assert layer.dtype_policy.name == "float32"
    assert layer.quantization_mode is None
    np.testing.assert_array_equal(numpy_of(layer(IDS)), numpy_of(layer.embeddings)[IDS])


def test_model_quantize_float8_warns_and_leaves_layer_float():
    """`Model.quantize("float8")` skips the table with Keras's warning, as it
    skips Keras's layer (Keras 3.15 warns for each layer, later Keras once for
    the model)."""
    warnings = []
    for layer_class in (Embedding, keras.layers.Embedding):
        model = keras.Sequential(
            [keras.Input((4,), dtype="int32"), layer_class(VOCAB, 8, name="table")],
            name="model",
        )
        with pytest.warns(UserWarning) as record:
            model.quantize("float8")
        assert model.layers[0].quantization_mode is None
        assert [v.name for v in model.layers[0].weights] == ["embeddings"]
        warnings.append([str(warning.message) for warning in record])
    assert warnings[0] == warnings[1]
    assert warnings[0]


def test_subclass_needs_type_check_false(rng):
    class Subclass(Embedding):
        pass

    layer = Subclass(VOCAB, 8)
    layer.build()
    with pytest.raises(NotImplementedError, match="does not have a `quantize` method"):
        layer.quantize("int8")
    layer.quantize("int8", type_check=False)
    assert layer.quantization_mode == "int8"


def test_config_mode_must_match_policy_mode():
    with pytest.raises(ValueError, match="`quantization_config` is for mode 'int8'"):
        Embedding(
            VOCAB,
            8,
            dtype="int4_from_float32",
            quantization_config=keras.quantizers.Int8QuantizationConfig(),
        )


def test_merge_lora_on_quantized_layer_without_lora_is_refused(rng):
    layer, _ = quantized(8, "int8", None, rng)
    with pytest.raises(ValueError, match="has no LoRA adapters to merge"):
        layer.merge_lora()


# Lookups never build a table-sized temporary.

BIG_VOCAB = 4096


def table_sized_temporaries(layer, ids):
    """Shapes of the values a lookup computes that hold `BIG_VOCAB` elements
    or more; reading a variable is not counted, only what is computed."""
    ids = ops.convert_to_tensor(ids)
    sizes = []
    if BACKEND == "jax":
        import jax

        def lookup(non_trainable, ids):
            return layer.stateless_call(layer.trainable_variables, non_trainable, ids)[
                0
            ]

        values = [v.value for v in layer.non_trainable_variables]
        jaxpr = jax.make_jaxpr(lookup)(values, ids)

        def walk(closed):
            for equation in closed.eqns:
                for var in equation.outvars:
                    sizes.append(tuple(var.aval.shape))
                for param in equation.params.values():
                    inner = getattr(param, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))

        walk(jaxpr.jaxpr)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        graph = tf.function(layer).get_concrete_function(ids).graph
        for operation in graph.get_operations():
            if operation.type in ("ReadVariableOp", "VarHandleOp", "Placeholder"):
                continue
            sizes.extend(tuple(output.shape) for output in operation.outputs)
    else:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # Views share their input's storage: not temporaries.
                if not func.is_view:
                    for tensor in torch.utils._pytree.tree_leaves(out):
                        if isinstance(tensor, torch.Tensor):
                            sizes.append(tuple(tensor.shape))
                return out

        with Record():
            layer(ids)
    return [
        shape
        for shape in sizes
        if None not in shape and int(np.prod(shape, dtype="int64")) >= BIG_VOCAB
    ]


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("lora", [False, True])
def test_lookup_builds_no_table_sized_temporary(mode, block_size, lora):
    layer = Embedding(BIG_VOCAB, 64)
    layer.build()
    layer.quantize(mode, config=config_for(mode, block_size))
    if lora:
        layer.enable_lora(4)
    assert table_sized_temporaries(layer, IDS) == []


def test_keras_lora_lookup_builds_the_whole_table():
    """The check above can fail: Keras's layer with LoRA trips it, merging
    the adapters into the whole table on every call. (Keras 3.15's int4
    layer also unpacks the whole table; later Keras gathers first.)"""
    layer = keras.layers.Embedding(BIG_VOCAB, 64)
    layer.build()
    layer.enable_lora(4)
    sizes = [int(np.prod(shape)) for shape in table_sized_temporaries(layer, IDS)]
    assert max(sizes) >= BIG_VOCAB * 64


@pytest.mark.parametrize("form", ["nibbles", "integer_nibbles"])
def test_both_nibble_forms_unpack_every_byte(form):
    """Every int8 byte unpacks to its signed low and high nibbles (low in
    the low four bits), as float32, in the float form traced functions hold
    and in the int8 form eager projections run."""
    from keras_ext_embedding import _quantization

    packed = np.arange(-128, 128).astype("int8").reshape(16, 16)
    low, high = getattr(_quantization, form)(ops.convert_to_tensor(packed))
    as_int = packed.astype("int32")
    assert dtype_of(low) == dtype_of(high) == "float32"
    np.testing.assert_array_equal(ops.convert_to_numpy(high), as_int >> 4)
    np.testing.assert_array_equal(ops.convert_to_numpy(low), ((as_int & 15) ^ 8) - 8)


@pytest.mark.parametrize("shifted", [False, True], ids=["unpacked", "shifted"])
@pytest.mark.parametrize("layout", ["rows_first", "groups_first"])
def test_nibble_product_multiplies_every_byte_by_its_nibbles(shifted, layout):
    """`NibbleProduct` gives `low . even + high . odd` over every byte's
    signed nibbles, plus its offset: unpacking them, and without unpacking
    them (the flipped-sign-bit form eager projections run)."""
    from keras_ext_embedding import _projection

    rng = np.random.default_rng(3)
    packed = np.arange(-128, 128).astype("int8").reshape(16, 16)
    as_int = packed.astype("int64")
    low, high = ((as_int & 15) ^ 8) - 8, as_int >> 4
    if layout == "rows_first":
        # (rows, half) bytes against (half, n) hidden columns.
        even, odd = rng.normal(size=(2, 16, 3)).astype("float32")
        bytes_ = packed
        expected = low @ even.astype("float64") + high @ odd.astype("float64")
    else:
        # (groups, rows, half) against (groups, half, n).
        even, odd = rng.normal(size=(2, 2, 8, 3)).astype("float32")
        bytes_ = packed.reshape(16, 2, 8).transpose(1, 0, 2)
        grouped = [v.reshape(16, 2, 8).transpose(1, 0, 2) for v in (low, high)]
        expected = grouped[0] @ even.astype("float64") + grouped[1] @ odd
    product = _projection.NibbleProduct(
        ops.convert_to_tensor(even),
        ops.convert_to_tensor(odd),
        shifted=shifted,
        grouped=layout == "groups_first",
    )
    got = product.logits(ops.convert_to_tensor(bytes_))
    if shifted:
        got = ops.add(got, product.offset)
    else:
        assert product.offset is None
    assert dtype_of(got) == "float32"
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), expected, rtol=1e-5, atol=1e-5
    )

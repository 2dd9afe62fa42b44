"""Construction, config, variables and lookups: a drop-in keras.layers.Embedding."""

import inspect
import json
import warnings

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import dtype_of, run_layer_checks, table_of, to_numpy

from keras_ext_embedding import Embedding

BASE_CONFIG_KEYS = {"name", "trainable", "dtype"}


def positive_int_message(name, value, type_name):
    return (
        f"`{name}` must be a positive integer. "
        f"Received: {name}={value} (of type {type_name})."
    )


def positive_number_message(name, value, type_name):
    return (
        f"`{name}` must be a positive number. "
        f"Received: {name}={value} (of type {type_name})."
    )


ARGUMENT_ERRORS = [
    ({"input_dim": 3.7}, positive_int_message("input_dim", 3.7, "float")),
    ({"input_dim": 10.0}, positive_int_message("input_dim", 10.0, "float")),
    ({"input_dim": 0}, positive_int_message("input_dim", 0, "int")),
    ({"input_dim": -5}, positive_int_message("input_dim", -5, "int")),
    ({"input_dim": True}, positive_int_message("input_dim", True, "bool")),
    ({"input_dim": None}, positive_int_message("input_dim", None, "NoneType")),
    ({"output_dim": 2.5}, positive_int_message("output_dim", 2.5, "float")),
    ({"output_dim": 0}, positive_int_message("output_dim", 0, "int")),
    ({"output_dim": -2}, positive_int_message("output_dim", -2, "int")),
    ({"output_dim": False}, positive_int_message("output_dim", False, "bool")),
    ({"output_dim": "4"}, positive_int_message("output_dim", 4, "str")),
    ({"lora_rank": 0}, positive_int_message("lora_rank", 0, "int")),
    ({"lora_rank": -1}, positive_int_message("lora_rank", -1, "int")),
    ({"lora_rank": 1.5}, positive_int_message("lora_rank", 1.5, "float")),
    ({"lora_rank": True}, positive_int_message("lora_rank", True, "bool")),
    ({"lora_rank": False}, positive_int_message("lora_rank", False, "bool")),
    (
        {"lora_rank": 2, "lora_alpha": 0},
        positive_number_message("lora_alpha", 0, "int"),
    ),
    (
        {"lora_rank": 2, "lora_alpha": -1.5},
        positive_number_message("lora_alpha", -1.5, "float"),
    ),
    (
        {"lora_rank": 2, "lora_alpha": True},
        positive_number_message("lora_alpha", True, "bool"),
    ),
    (
        {"lora_rank": 2, "lora_alpha": "8"},
        positive_number_message("lora_alpha", 8, "str"),
    ),
    (
        {"lora_rank": 2, "lora_alpha": float("nan")},
        positive_number_message("lora_alpha", "nan", "float"),
    ),
    (
        {"invalid_ids": "clip"},
        "`invalid_ids` must be one of ('raise', 'zeros'). "
        "Received: invalid_ids='clip'.",
    ),
    (
        {"invalid_ids": "RAISE"},
        "`invalid_ids` must be one of ('raise', 'zeros'). "
        "Received: invalid_ids='RAISE'.",
    ),
    (
        {"invalid_ids": None},
        "`invalid_ids` must be one of ('raise', 'zeros'). Received: invalid_ids=None.",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), ARGUMENT_ERRORS)
def test_argument_errors(overrides, message):
    kwargs = {"input_dim": 10, "output_dim": 4, **overrides}
    with pytest.raises(ValueError) as info:
        Embedding(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        {"input_dim": 3.7},
        {"input_dim": 0},
        {"input_dim": True},
        {"output_dim": -2},
        {"output_dim": False},
        {"output_dim": "4"},
    ],
)
def test_dimension_errors_are_keras_messages(overrides):
    kwargs = {"input_dim": 10, "output_dim": 4, **overrides}
    with pytest.raises(ValueError) as ours:
        Embedding(**kwargs)
    with pytest.raises(ValueError) as theirs:
        keras.layers.Embedding(**kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "config", ["int8", {"mode": "int4"}, keras.quantizers.Float8QuantizationConfig()]
)
def test_quantization_config_must_be_an_int8_or_int4_config(config):
    with pytest.raises(ValueError, match="`quantization_config` must be None, a"):
        Embedding(10, 4, quantization_config=config)


def test_input_length_warns_like_keras():
    with pytest.warns(UserWarning) as record:
        layer = Embedding(10, 4, input_length=5)
    assert [str(w.message) for w in record] == [
        "Argument `input_length` is deprecated. Just remove it."
    ]
    assert layer.input_dim == 10
    assert "input_length" not in layer.get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Embedding(10, 4)


def test_signature_and_defaults_match_keras():
    ours = inspect.signature(Embedding.__init__).parameters
    theirs = inspect.signature(keras.layers.Embedding.__init__).parameters
    named = [name for name, p in theirs.items() if p.kind != p.VAR_KEYWORD]
    # Same positional order, so positional callers of Keras's layer work too.
    assert list(ours)[: len(named)] == named
    for name in named:
        assert ours[name].default == theirs[name].default, name
    assert ours["invalid_ids"].default == "raise"
    assert ours["kwargs"].kind == inspect.Parameter.VAR_KEYWORD


def test_positional_arguments_like_keras():
    layer = Embedding(10, 4, "zeros", None, None, True)
    assert layer.mask_zero is True
    assert isinstance(layer.embeddings_initializer, keras.initializers.Zeros)


def test_defaults():
    layer = Embedding(10, 4)
    assert (layer.input_dim, layer.output_dim) == (10, 4)
    assert layer.mask_zero is False
    assert layer.lora_rank is None and layer.lora_alpha is None
    assert layer.lora_enabled is False
    assert layer.invalid_ids == "raise"
    assert layer.quantization_config is None
    assert isinstance(layer.embeddings_initializer, keras.initializers.RandomUniform)


CONFIG_CASES = [
    {},
    {"mask_zero": True},
    {
        "embeddings_initializer": "glorot_normal",
        "embeddings_regularizer": "l2",
        "activity_regularizer": "l1",
        "embeddings_constraint": "non_neg",
        "trainable": False,
        "dtype": "bfloat16",
    },
    {"lora_rank": 2},
    {"lora_rank": 2, "lora_alpha": 4.5},
]


@pytest.mark.parametrize("kwargs", CONFIG_CASES)
def test_config_equals_keras_config(kwargs):
    ours = Embedding(10, 4, name="tokens", **kwargs).get_config()
    theirs = keras.layers.Embedding(10, 4, name="tokens", **kwargs).get_config()
    assert set(ours) >= BASE_CONFIG_KEYS
    assert set(ours) == set(theirs)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert ("lora_rank" in ours) == ("lora_rank" in kwargs)


def test_lora_config_keys_after_enable_lora():
    layer = Embedding(10, 4)
    layer.build()
    layer.enable_lora(3, lora_alpha=6)
    config = layer.get_config()
    assert config["lora_rank"] == 3
    assert config["lora_alpha"] == 6
    assert set(config) == set(keras.layers.Embedding(10, 4, lora_rank=3).get_config())


def test_config_keeps_lora_alpha_through_build():
    layer = Embedding(10, 4, lora_rank=2, lora_alpha=5)
    layer.build()
    assert layer.get_config()["lora_alpha"] == 5
    assert Embedding.from_config(layer.get_config()).lora_alpha == 5


def test_invalid_ids_in_config_only_when_not_default():
    assert "invalid_ids" not in Embedding(10, 4).get_config()
    config = Embedding(10, 4, invalid_ids="zeros").get_config()
    assert config["invalid_ids"] == "zeros"
    assert Embedding.from_config(config).invalid_ids == "zeros"


def test_default_config_loads_into_keras_embedding():
    config = Embedding(10, 4, mask_zero=True, name="tokens").get_config()
    theirs = keras.layers.Embedding.from_config(config)
    assert json.dumps(theirs.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )


def test_registered_name():
    assert (
        keras.saving.get_registered_name(Embedding) == "keras_ext_embedding>Embedding"
    )
    assert keras.saving.get_registered_object("keras_ext_embedding>Embedding") is (
        Embedding
    )


def test_variable_names_and_order():
    layer = Embedding(10, 4, name="tokens")
    layer.build()
    assert [v.name for v in layer.weights] == ["embeddings"]
    assert [v.path for v in layer.weights] == ["tokens/embeddings"]
    assert layer.trainable_weights == layer.weights

    keras_layer = keras.layers.Embedding(10, 4, name="tokens")
    keras_layer.build()
    assert [v.path for v in layer.weights] == [v.path for v in keras_layer.weights]


@pytest.mark.parametrize("how", ["constructor", "enable_lora"])
def test_lora_variable_names_and_order(how):
    if how == "constructor":
        layer = Embedding(10, 4, lora_rank=2, dtype="bfloat16")
        layer.build()
    else:
        layer = Embedding(10, 4, dtype="bfloat16")
        layer.build()
        layer.enable_lora(2)
    assert [(v.name, tuple(v.shape), dtype_of(v)) for v in layer.weights] == [
        ("embeddings", (10, 4), "bfloat16"),
        ("lora_embeddings_a", (10, 2), "float32"),
        ("lora_embeddings_b", (2, 4), "float32"),
    ]
    assert [v.name for v in layer.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    assert [v.name for v in layer.non_trainable_weights] == ["embeddings"]


def test_table_dtype_follows_the_policy():
    assert dtype_of(Embedding(10, 4, weights=np.zeros((10, 4))).weights[0]) == (
        "float32"
    )
    layer = Embedding(10, 4, dtype="float64")
    layer.build()
    assert dtype_of(layer.weights[0]) == "float64"


def test_embeddings_property_before_build():
    layer = Embedding(10, 4)
    with pytest.raises(AttributeError) as info:
        _ = layer.embeddings
    assert "You must build the layer before accessing `embeddings`." in str(info.value)
    assert not hasattr(layer, "embeddings")
    layer.build()
    assert layer.embeddings is layer.weights[0]


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = Embedding(10, 4).no_such_thing


def test_weights_argument_sets_the_table(rng):
    table = rng.normal(size=(10, 4)).astype("float32")
    for weights in (table, [table], (table,)):
        layer = Embedding(10, 4, weights=weights)
        assert layer.built
        np.testing.assert_array_equal(ops.convert_to_numpy(layer.embeddings), table)
    out = layer(np.array([[3, 9]]))
    np.testing.assert_array_equal(to_numpy(out), table[[[3, 9]]])


def test_weights_argument_is_cast_to_the_table_dtype(rng):
    table = rng.normal(size=(10, 4))  # float64
    layer = Embedding(10, 4, weights=table)
    assert dtype_of(layer.embeddings) == "float32"
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.embeddings), table.astype("float32")
    )


@pytest.mark.parametrize(
    ("weights", "shape"),
    [
        (np.zeros((5, 4)), "(5, 4)"),
        (np.zeros((10, 3)), "(10, 3)"),
        (np.zeros((10,)), "(10,)"),
        ([np.zeros((10, 4)), np.zeros((10, 4))], "(2, 10, 4)"),
    ],
)
def test_weights_argument_wrong_shape(weights, shape):
    with pytest.raises(ValueError) as info:
        Embedding(10, 4, weights=weights)
    message = str(info.value)
    assert f"of shape {shape}" in message
    assert "the layer expects (10, 4)" in message


def test_regularizer_adds_a_loss():
    layer = Embedding(10, 4, embeddings_regularizer=keras.regularizers.L2(0.5))
    assert layer.losses == []
    layer(np.array([1]))
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.losses[0])),
        0.5 * np.sum(table_of(layer) ** 2),
        rtol=1e-5,
    )


def test_regularizer_enters_the_training_loss():
    layer = Embedding(10, 4, embeddings_regularizer=keras.regularizers.L2(1.0))
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    ids = np.array([[1, 2]], dtype="int32")
    targets = np.zeros((1, 2, 4), dtype="float32")
    loss = model.evaluate(ids, targets, verbose=0)
    table = table_of(layer)
    expected = np.mean(table[[[1, 2]]] ** 2) + np.sum(table**2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_constraint_applied_after_a_fit_step():
    layer = Embedding(10, 4, embeddings_constraint=keras.constraints.NonNeg())
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            layer,
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    model.build((None, 2))
    # The uniform initializer gives negative entries: the constraint must
    # clip every row after the step, looked up or not.
    assert table_of(layer).min() < 0
    model.fit(np.array([[1, 2]]), np.array([[-50.0]]), epochs=1, verbose=0)
    assert table_of(layer).min() >= 0


@pytest.mark.parametrize(
    "shape", [(), (7,), (3, 5), (2, 3, 4), (0,), (0, 5), (4, 0, 2), (2, 3, 0)]
)
@pytest.mark.parametrize("as_tensor", [True, False])
def test_ids_of_any_rank_give_exact_rows(shape, as_tensor, rng):
    layer = Embedding(20, 3)
    ids = rng.integers(0, 20, size=shape).astype("int32")
    out = layer(ops.convert_to_tensor(ids) if as_tensor else ids)
    assert tuple(out.shape) == (*shape, 3)
    assert dtype_of(out) == "float32"
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids])


def test_python_ids():
    layer = Embedding(20, 3)
    out = layer([[1, 2], [19, 0]])
    table = table_of(layer)
    assert tuple(out.shape) == (2, 2, 3)
    np.testing.assert_array_equal(to_numpy(out), table[[[1, 2], [19, 0]]])
    np.testing.assert_array_equal(to_numpy(layer([7])), table[[7]])
    scalar = layer(5)
    assert tuple(scalar.shape) == (3,)
    np.testing.assert_array_equal(to_numpy(scalar), table[5])


def test_numpy_ids():
    layer = Embedding(20, 3)
    out = layer(np.array([5, 6], dtype="int64"))
    table = table_of(layer)
    np.testing.assert_array_equal(to_numpy(out), table[[5, 6]])
    np.testing.assert_array_equal(to_numpy(layer(np.int32(19))), table[19])


def test_keras_docstring_example():
    model = keras.Sequential([Embedding(1000, 64)])
    ids = np.random.randint(1000, size=(32, 10))
    model.compile("rmsprop", "mse")
    out = model.predict(ids, verbose=0)
    assert out.shape == (32, 10, 64)
    np.testing.assert_array_equal(out, table_of(model.layers[0])[ids])


def same_weights_pair(**kwargs):
    ours = Embedding(50, 8, **kwargs)
    theirs = keras.layers.Embedding(50, 8, **kwargs)
    ours.build()
    theirs.build()
    theirs.set_weights(ours.get_weights())
    return ours, theirs


def test_same_output_as_keras_embedding(rng):
    ours, theirs = same_weights_pair()
    ids = rng.integers(0, 50, size=(4, 6)).astype("int32")
    np.testing.assert_array_equal(to_numpy(ours(ids)), to_numpy(theirs(ids)))
    tensor_ids = ops.convert_to_tensor(ids)
    np.testing.assert_array_equal(
        to_numpy(ours(tensor_ids)), to_numpy(theirs(tensor_ids))
    )
    symbolic = keras.Input((6,), dtype="int32")
    assert ours(symbolic).shape == theirs(symbolic).shape


def test_same_mask_as_keras_embedding():
    ours, theirs = same_weights_pair(mask_zero=True)
    ids = ops.convert_to_tensor(np.array([[1, 0, 3], [0, 0, 49]], dtype="int32"))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ours.compute_mask(ids)),
        ops.convert_to_numpy(theirs.compute_mask(ids)),
    )


def test_activity_regularizer_and_base_kwargs():
    layer = Embedding(10, 4, activity_regularizer="l2", trainable=False, name="tokens")
    layer(np.array([1, 2]))
    assert layer.name == "tokens"
    assert layer.trainable_weights == []
    assert len(layer.losses) == 1
    assert layer.get_config()["activity_regularizer"] is not None


def test_compute_output_shape_and_spec():
    layer = Embedding(10, 4)
    assert layer.compute_output_shape((None, 7)) == (None, 7, 4)
    assert layer.compute_output_shape(()) == (4,)
    spec = layer.compute_output_spec(keras.KerasTensor((2, 3), dtype="int32"))
    assert spec.shape == (2, 3, 4)
    assert spec.dtype == "float32"


IDS_2D = np.array([[1, 2, 3], [4, 5, 0]], dtype="int32")
PLAIN_WEIGHTS = [("embeddings", (10, 4))]
LORA_WEIGHTS = [
    ("embeddings", (10, 4)),
    ("lora_embeddings_a", (10, 2)),
    ("lora_embeddings_b", (2, 4)),
]


@pytest.mark.parametrize(
    ("kwargs", "weights"),
    [
        ({}, PLAIN_WEIGHTS),
        ({"mask_zero": True}, PLAIN_WEIGHTS),
        ({"lora_rank": 2, "lora_alpha": 3}, LORA_WEIGHTS),
        ({"invalid_ids": "zeros"}, PLAIN_WEIGHTS),
        ({"embeddings_regularizer": "l2", "activity_regularizer": "l1"}, PLAIN_WEIGHTS),
    ],
)
def test_layer_checks(kwargs, weights):
    def make_layer(**overrides):
        return Embedding(10, 4, **{**kwargs, **overrides})

    run_layer_checks(make_layer, IDS_2D, (2, 3, 4), expected_weights=weights)


@pytest.mark.parametrize("shape", [(5,), (2, 2, 3)])
def test_layer_checks_other_ranks(shape, rng):
    ids = rng.integers(0, 10, size=shape).astype("int32")
    run_layer_checks(
        lambda **overrides: Embedding(10, 4, **overrides),
        ids,
        (*shape, 4),
        expected_weights=PLAIN_WEIGHTS,
        check_mixed=False,
    )


def test_no_warnings_on_plain_calls():
    layer = Embedding(10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(np.array([1, 2], dtype="int32"))
        layer(ops.convert_to_tensor(np.array([1, 2], dtype="int32")))

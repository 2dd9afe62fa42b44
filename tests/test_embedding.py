import inspect
import warnings

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import run_layer_checks, table_of, to_numpy

from keras_ext_embedding import Embedding


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"input_dim": 3.7, "output_dim": 2},
            "`input_dim` must be a positive integer. Received: input_dim=3.7 "
            "(of type float).",
        ),
        (
            {"input_dim": 0, "output_dim": 2},
            "`input_dim` must be a positive integer. Received: input_dim=0",
        ),
        (
            {"input_dim": True, "output_dim": 2},
            "`input_dim` must be a positive integer. Received: input_dim=True "
            "(of type bool).",
        ),
        (
            {"input_dim": 10, "output_dim": -2},
            "`output_dim` must be a positive integer. Received: output_dim=-2",
        ),
        (
            {"input_dim": 10, "output_dim": "4"},
            "`output_dim` must be a positive integer. Received: output_dim=4 "
            "(of type str).",
        ),
        (
            {"input_dim": 10, "output_dim": 4, "lora_rank": 0},
            "`lora_rank` must be a positive integer. Received: lora_rank=0",
        ),
        (
            {"input_dim": 10, "output_dim": 4, "lora_rank": False},
            "`lora_rank` must be a positive integer. Received: lora_rank=False",
        ),
        (
            {"input_dim": 10, "output_dim": 4, "lora_rank": 2, "lora_alpha": -1},
            "`lora_alpha` must be a positive number. Received: lora_alpha=-1",
        ),
        (
            {"input_dim": 10, "output_dim": 4, "invalid_ids": "clip"},
            "`invalid_ids` must be one of ('raise', 'zeros'). Received: "
            "invalid_ids='clip'.",
        ),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        Embedding(**kwargs)
    assert message in str(info.value)


def test_quantization_config_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="does not support quantization"):
        Embedding(10, 4, quantization_config="int8")


def test_input_length_warns_like_keras():
    with pytest.warns(UserWarning, match="`input_length` is deprecated"):
        layer = Embedding(10, 4, input_length=5)
    assert layer.input_dim == 10


def test_defaults_match_keras():
    ours = inspect.signature(Embedding.__init__).parameters
    theirs = inspect.signature(keras.layers.Embedding.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name


@pytest.mark.parametrize("lora", [False, True])
def test_config_keys_match_keras(lora):
    kwargs = {"lora_rank": 2, "lora_alpha": 4} if lora else {}
    ours = Embedding(10, 4, mask_zero=True, **kwargs).get_config()
    theirs = keras.layers.Embedding(10, 4, mask_zero=True, **kwargs).get_config()
    assert set(ours) == set(theirs)
    for key in ("input_dim", "output_dim", "mask_zero", "embeddings_initializer"):
        assert ours[key] == theirs[key]


def test_invalid_ids_in_config_only_when_not_default():
    assert "invalid_ids" not in Embedding(10, 4).get_config()
    config = Embedding(10, 4, invalid_ids="zeros").get_config()
    assert config["invalid_ids"] == "zeros"
    assert Embedding.from_config(config).invalid_ids == "zeros"


def test_registered_name():
    assert (
        keras.saving.get_registered_name(Embedding) == "keras_ext_embedding>Embedding"
    )


def test_variables_names_and_order():
    layer = Embedding(10, 4, lora_rank=2)
    layer.build()
    assert [v.name for v in layer.weights] == [
        "embeddings",
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    assert [tuple(v.shape) for v in layer.weights] == [(10, 4), (10, 2), (2, 4)]


def test_embeddings_property_before_build():
    with pytest.raises(AttributeError, match="build the layer before accessing"):
        _ = Embedding(10, 4).embeddings


def test_weights_argument_sets_the_table(rng):
    table = rng.normal(size=(10, 4)).astype("float32")
    layer = Embedding(10, 4, weights=table)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.embeddings), table)
    layer = Embedding(10, 4, weights=[table])
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.embeddings), table)
    out = layer(np.array([[3, 9]]))
    np.testing.assert_array_equal(to_numpy(out), table[[[3, 9]]])


def test_weights_argument_wrong_shape():
    with pytest.raises(ValueError, match=r"of shape \(5, 4\).*expects \(10, 4\)"):
        Embedding(10, 4, weights=np.zeros((5, 4)))


@pytest.mark.parametrize(
    "shape", [(), (7,), (3, 5), (2, 3, 4), (0,), (0, 5), (4, 0, 2)]
)
def test_ids_of_any_rank_give_exact_rows(shape, rng):
    layer = Embedding(20, 3)
    ids = rng.integers(0, 20, size=shape).astype("int32")
    out = layer(ops.convert_to_tensor(ids))
    assert tuple(out.shape) == (*shape, 3)
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids])


def test_numpy_and_list_ids():
    layer = Embedding(20, 3)
    out = layer([[1, 2], [19, 0]])
    table = table_of(layer)
    np.testing.assert_array_equal(to_numpy(out), table[[[1, 2], [19, 0]]])
    out = layer(np.array([5, 6], dtype="int64"))
    np.testing.assert_array_equal(to_numpy(out), table[[5, 6]])


def test_seed_example_shape():
    model = keras.Sequential([Embedding(1000, 64)])
    ids = np.random.randint(1000, size=(32, 10))
    model.compile("rmsprop", "mse")
    assert model.predict(ids, verbose=0).shape == (32, 10, 64)


def test_same_output_as_keras_embedding(rng):
    ours = Embedding(50, 8)
    theirs = keras.layers.Embedding(50, 8)
    ours.build()
    theirs.build()
    theirs.set_weights(ours.get_weights())
    ids = rng.integers(0, 50, size=(4, 6))
    np.testing.assert_array_equal(to_numpy(ours(ids)), to_numpy(theirs(ids)))


def test_regularizer_adds_a_loss():
    layer = Embedding(10, 4, embeddings_regularizer=keras.regularizers.L2(0.5))
    layer(np.array([1]))
    table = table_of(layer)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.losses[0])),
        0.5 * np.sum(table**2),
        rtol=1e-5,
    )


def test_constraint_applied_after_a_fit_step():
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            Embedding(10, 4, embeddings_constraint=keras.constraints.NonNeg()),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    model.fit(np.array([[1, 2]]), np.array([[-50.0]]), epochs=2, verbose=0)
    assert table_of(model.layers[0]).min() >= 0


def test_activity_regularizer_and_trainable_kwargs():
    layer = Embedding(10, 4, activity_regularizer="l2", trainable=False, name="tokens")
    layer(np.array([1, 2]))
    assert layer.name == "tokens"
    assert layer.trainable_weights == []
    assert len(layer.losses) == 1
    assert layer.get_config()["activity_regularizer"] is not None


def test_compute_output_shape_and_spec():
    layer = Embedding(10, 4)
    assert layer.compute_output_shape((None, 7)) == (None, 7, 4)
    spec = layer.compute_output_spec(keras.KerasTensor((2, 3), dtype="int32"))
    assert spec.shape == (2, 3, 4)
    assert spec.dtype == "float32"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mask_zero": True},
        {"lora_rank": 2, "lora_alpha": 3},
        {"invalid_ids": "zeros"},
        {"embeddings_regularizer": "l2"},
    ],
)
def test_layer_checks(kwargs):
    ids = np.array([[1, 2, 3], [4, 5, 0]])

    def make_layer(**overrides):
        return Embedding(10, 4, **{**kwargs, **overrides})

    run_layer_checks(make_layer, ids)


def test_no_warnings_on_a_plain_call():
    layer = Embedding(10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(np.array([1, 2], dtype="int32"))

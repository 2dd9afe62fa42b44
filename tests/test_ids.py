"""Ids: one behaviour on every backend, eagerly and inside Model.fit/predict."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

# Keras compiles Model.fit/predict on TensorFlow and JAX; on PyTorch it runs
# them eagerly unless jit_compile=True, so the ids there can be read.
PREDICT_IS_TRACED = BACKEND in ("tensorflow", "jax")


def message_parts(name, value, position, input_dim):
    return [
        f"Layer '{name}' received an invalid id {value!r} at position {position}",
        f"Ids must be whole numbers in [0, {input_dim - 1}] (input_dim={input_dim})",
    ]


def assert_invalid_id_error(error, name, value, position, input_dim):
    for part in message_parts(name, value, position, input_dim):
        assert part in str(error), str(error)


@pytest.mark.parametrize(
    "dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_integer_ids_of_any_width(dtype, as_tensor):
    layer = Embedding(100, 3)
    ids = np.array([[0, 7], [99, 42]], dtype=dtype)
    arg = ops.convert_to_tensor(ids, dtype=dtype) if as_tensor else ids
    out = layer(arg)
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids.astype(int)])


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_wide_numpy_ids_are_never_narrowed(dtype):
    # JAX without x64 turns int64 into int32 and PyTorch has no uint64: a
    # narrowing conversion would wrap 2**32 + 3 to 3, a valid row.
    layer = Embedding(10, 3, name="wide")
    with pytest.raises(InvalidIdError) as info:
        layer(np.array([1, 2**32 + 3], dtype=dtype))
    assert_invalid_id_error(info.value, "wide", 2**32 + 3, (1,), 10)
    ok = np.array([[9, 0]], dtype=dtype)
    np.testing.assert_array_equal(to_numpy(layer(ok)), table_of(layer)[[[9, 0]]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_whole_float_ids_are_accepted(dtype):
    layer = Embedding(200, 3)
    ids = ops.convert_to_tensor(np.array([[0.0, 3.0], [199.0, 42.0]]), dtype=dtype)
    np.testing.assert_array_equal(
        to_numpy(layer(ids)), table_of(layer)[[[0, 3], [199, 42]]]
    )


@pytest.mark.parametrize(
    ("dtype", "largest_ok"),
    [("float16", 2049), ("bfloat16", 257), ("float32", 2**24 + 1)],
)
def test_float_dtype_must_hold_every_id(dtype, largest_ok):
    ids = ops.convert_to_tensor(np.array([1.0, 2.0]), dtype=dtype)
    Embedding(largest_ok, 2)(ids)  # ids up to largest_ok - 1 are exact
    with pytest.raises(ValueError, match=f"ids of dtype {dtype}") as info:
        Embedding(largest_ok + 1, 2, name="too_big")(ids)
    assert "Pass integer ids" in str(info.value)
    assert "Layer 'too_big'" in str(info.value)


def test_float_capacity_checked_for_numpy_ids_too():
    with pytest.raises(ValueError, match="ids of dtype float16"):
        Embedding(5000, 2)(np.array([1.0], dtype="float16"))


@pytest.mark.parametrize("ids", [np.array([True, False]), np.array(["a", "b"])])
def test_non_numeric_ids_are_refused(ids):
    with pytest.raises(TypeError, match="expects integer ids"):
        Embedding(10, 2)(ids)


def test_bool_tensor_ids_are_refused():
    with pytest.raises(TypeError, match="expects integer ids"):
        Embedding(10, 2)(ops.convert_to_tensor(np.array([True, False])))


@pytest.mark.parametrize(
    ("ids", "value", "position"),
    [
        (np.array([[1, 2], [3, 10]]), 10, (1, 1)),
        (np.array([[1, -1], [3, 4]]), -1, (0, 1)),
        (np.array([5, 2**31 - 1]), 2**31 - 1, (1,)),
        (np.array([1.7, 2.0]), 1.7, (0,)),
        (np.array([2.0, -0.5]), -0.5, (1,)),
        (np.array([np.nan]), float("nan"), (0,)),
        (np.array([1.0, np.inf]), float("inf"), (1,)),
        (np.array(10), 10, ()),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_eager_invalid_ids_raise(ids, value, position, as_tensor):
    layer = Embedding(10, 3, name="tokens")
    arg = ops.convert_to_tensor(ids) if as_tensor else ids
    with pytest.raises(InvalidIdError) as info:
        layer(arg)
    assert isinstance(info.value, ValueError)
    assert_invalid_id_error(info.value, "tokens", value, position, 10)


def test_invalid_id_error_from_a_model_call():
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), Embedding(10, 3, name="tokens")]
    )
    with pytest.raises(InvalidIdError) as info:
        model(ops.convert_to_tensor(np.array([[1, 2, 12]], dtype="int32")))
    assert_invalid_id_error(info.value, "tokens", 12, (0, 2), 10)


def make_model(**layer_kwargs):
    layer = Embedding(10, 3, name="tokens", **layer_kwargs)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    return model, layer


BAD_IDS = np.array([[1, 10, -1, 3], [2**20, 9, 0, -7]], dtype="int32")
BAD_MASK = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)


def expected_with_zeros(layer, ids=BAD_IDS, bad=BAD_MASK):
    expected = table_of(layer)[np.where(bad, 0, ids)]
    expected[bad] = 0.0
    return expected


@pytest.mark.skipif(not PREDICT_IS_TRACED, reason="predict runs eagerly on torch")
@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_compiled_predict_gives_zeros_at_invalid_positions(jit_compile):
    model, layer = make_model()
    model.compile(jit_compile=jit_compile)
    out = model.predict(BAD_IDS, verbose=0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, expected_with_zeros(layer))


@pytest.mark.skipif(PREDICT_IS_TRACED, reason="predict is compiled on TF and JAX")
def test_eager_predict_raises_on_torch():
    model, _ = make_model()
    with pytest.raises(InvalidIdError, match="received an invalid id 10"):
        model.predict(BAD_IDS, verbose=0)


def test_run_eagerly_predict_raises_everywhere():
    model, _ = make_model()
    model.compile(run_eagerly=True)
    with pytest.raises(InvalidIdError) as info:
        model.predict(BAD_IDS, verbose=0)
    assert_invalid_id_error(info.value, "tokens", 10, (0, 1), 10)


def test_invalid_ids_zeros_mode_everywhere():
    model, layer = make_model(invalid_ids="zeros")
    eager = to_numpy(layer(BAD_IDS))
    np.testing.assert_array_equal(eager, expected_with_zeros(layer))
    np.testing.assert_array_equal(
        model.predict(BAD_IDS, verbose=0), expected_with_zeros(layer)
    )
    tensor_ids = ops.convert_to_tensor(BAD_IDS)
    np.testing.assert_array_equal(
        to_numpy(layer(tensor_ids)), expected_with_zeros(layer)
    )


def test_invalid_ids_zeros_mode_float_ids():
    layer = Embedding(10, 3, invalid_ids="zeros")
    ids = np.array([1.0, 1.5, np.nan, -2.0, 9.0, 10.0], dtype="float32")
    out = to_numpy(layer(ops.convert_to_tensor(ids)))
    table = table_of(layer)
    expected = np.zeros((6, 3))
    expected[0], expected[4] = table[1], table[9]
    np.testing.assert_array_equal(out, expected)


def fit_model(**layer_kwargs):
    model, layer = make_model(**layer_kwargs)
    model.add(keras.layers.GlobalAveragePooling1D())
    model.add(keras.layers.Dense(1))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model, layer


@pytest.mark.skipif(not PREDICT_IS_TRACED, reason="fit runs eagerly on torch")
def test_compiled_fit_with_invalid_ids_stays_finite():
    model, layer = fit_model()
    before = table_of(layer)
    history = model.fit(BAD_IDS, np.ones((2, 1)), epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = table_of(layer)
    assert np.isfinite(after).all()
    # Rows never looked up by a valid id do not move: invalid ids read no row.
    untouched = sorted(set(range(10)) - set(BAD_IDS[~BAD_MASK].tolist()))
    np.testing.assert_array_equal(after[untouched], before[untouched])


@pytest.mark.skipif(PREDICT_IS_TRACED, reason="fit is compiled on TF and JAX")
def test_eager_fit_raises_on_torch():
    model, _ = fit_model()
    with pytest.raises(InvalidIdError):
        model.fit(BAD_IDS, np.ones((2, 1)), epochs=1, verbose=0)


def test_fit_with_zeros_mode_never_raises_and_stays_finite():
    model, layer = fit_model(invalid_ids="zeros")
    history = model.fit(BAD_IDS, np.ones((2, 1)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(table_of(layer)).all()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_gives_zeros():
    import tensorflow as tf

    layer = Embedding(10, 3)
    layer.build()
    out = tf.function(layer)(tf.constant(BAD_IDS))
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jax_jit_gives_zeros():
    import jax

    layer = Embedding(10, 3)
    layer.build()

    @jax.jit
    def lookup(variables, ids):
        return layer.stateless_call(variables, [], ids)[0]

    out = lookup([v.value for v in layer.trainable_variables], BAD_IDS)
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is PyTorch's")
def test_torch_compile_zeros_mode():
    import torch

    layer = Embedding(10, 3, invalid_ids="zeros")
    layer.build()
    out = torch.compile(layer)(torch.tensor(BAD_IDS))
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))

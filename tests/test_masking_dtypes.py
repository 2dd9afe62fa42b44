"""Masks, dtype policies, and sparse and ragged ids."""

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import dtype_of, table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
# Keras's RNN layers consume a mask but, from the Keras 3.16 nightlies on, say
# `supports_masking = False` and warn that they drop it (after Keras's own
# Embedding too): Keras's warning, not about this layer.
RNN_MASK_WARNING = pytest.mark.filterwarnings(
    r"ignore:Layer '\w+' \(of type (LSTM|GRU)\) was passed an input with a mask"
    ":UserWarning"
)


# --- mask_zero -------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_compute_mask(as_tensor):
    layer = Embedding(10, 4, mask_zero=True)
    ids = np.array([[[1, 0], [3, 0]], [[0, 0], [0, 2]]], dtype="int32")
    mask = layer.compute_mask(ops.convert_to_tensor(ids) if as_tensor else ids)
    assert dtype_of(mask) == "bool"
    np.testing.assert_array_equal(ops.convert_to_numpy(mask), ids != 0)


def test_no_mask_without_mask_zero():
    layer = Embedding(10, 4)
    assert layer.compute_mask(np.array([[0, 1]])) is None
    assert not layer.supports_masking
    assert Embedding(10, 4, mask_zero=True).supports_masking


def test_mask_zero_still_looks_up_row_zero():
    layer = Embedding(10, 4, mask_zero=True)
    out = layer(np.array([0, 3]))
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[0, 3]])


def rnn_model(rnn, mask_zero, return_sequences=False):
    inputs = keras.Input((None,), dtype="int32")
    x = Embedding(20, 4, mask_zero=mask_zero)(inputs)
    outputs = rnn(3, return_sequences=return_sequences)(x)
    return keras.Model(inputs, outputs)


@RNN_MASK_WARNING
@pytest.mark.parametrize("rnn", [keras.layers.LSTM, keras.layers.GRU])
def test_mask_is_consumed_by_rnn(rnn):
    model = rnn_model(rnn, mask_zero=True)
    padded = np.array([[5, 7, 9, 0, 0], [4, 0, 0, 0, 0]], dtype="int32")
    final = to_numpy(model(padded))
    for row, length in ((0, 3), (1, 1)):
        unpadded = to_numpy(model(padded[row : row + 1, :length]))
        np.testing.assert_allclose(final[row : row + 1], unpadded, rtol=0, atol=1e-6)
    # Without the mask the padding changes the answer: the check can fail.
    unmasked = rnn_model(rnn, mask_zero=False)
    assert not np.allclose(
        to_numpy(unmasked(padded[:1])), to_numpy(unmasked(padded[:1, :3])), atol=1e-4
    )


@RNN_MASK_WARNING
@pytest.mark.parametrize("rnn", [keras.layers.LSTM, keras.layers.GRU])
def test_masked_timesteps_carry_the_last_unmasked_state(rnn):
    model = rnn_model(rnn, mask_zero=True, return_sequences=True)
    padded = np.array([[5, 7, 9, 0, 0]], dtype="int32")
    sequence = to_numpy(model(padded))
    unpadded = to_numpy(model(padded[:, :3]))
    np.testing.assert_allclose(sequence[:, :3], unpadded, rtol=0, atol=1e-6)
    for step in (3, 4):
        np.testing.assert_array_equal(sequence[:, step], sequence[:, 2])


def test_mask_reaches_the_next_layer_in_a_functional_model():
    inputs = keras.Input((None,), dtype="int32")
    x = Embedding(20, 4, mask_zero=True)(inputs)
    # Masked average: padding does not dilute the mean.
    outputs = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, outputs)
    layer = model.layers[1]
    out = to_numpy(model(np.array([[5, 7, 0, 0]], dtype="int32")))
    np.testing.assert_allclose(
        out[0], table_of(layer)[[5, 7]].mean(axis=0), rtol=1e-6, atol=1e-7
    )


# --- Dtype policies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "output_dtype"),
    [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
def test_mixed_precision_policies(policy, output_dtype):
    layer = Embedding(10, 4, dtype=policy)
    symbolic = layer(keras.Input((2,), dtype="int32"))
    assert symbolic.dtype == output_dtype
    out = layer(np.array([[1, 9]]))
    assert dtype_of(layer.embeddings) == "float32"
    assert layer.variable_dtype == "float32"
    assert dtype_of(out) == output_dtype
    expected = to_numpy(ops.cast(layer.embeddings, output_dtype))[[[1, 9]]]
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_global_mixed_policy():
    keras.config.set_dtype_policy("mixed_float16")
    layer = Embedding(10, 4)
    out = layer(np.array([3]))
    assert dtype_of(out) == "float16"
    assert dtype_of(layer.embeddings) == "float32"
    expected = to_numpy(ops.cast(layer.embeddings, "float16"))[[3]]
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_mixed_policy_does_not_round_float_ids():
    # Ids are never cast to float16, which would turn 2049.0 into 2048.0.
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((2,))  # float32 ids, Keras's default Input dtype
    layer = Embedding(3000, 2)
    model = keras.Model(inputs, layer(inputs))
    out = model.predict(np.array([[2049.0, 5.0]], dtype="float32"), verbose=0)
    table = to_numpy(ops.cast(layer.embeddings, "float16"))
    np.testing.assert_array_equal(out[0], table[[2049, 5]])
    assert not np.array_equal(table[2049], table[2048])


def test_bfloat16_table():
    layer = Embedding(10, 4, dtype="bfloat16")
    out = layer(np.array([1, 2]))
    assert dtype_of(layer.embeddings) == "bfloat16"
    assert dtype_of(out) == "bfloat16"
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[1, 2]])


def test_mixed_precision_training_step():
    layer = Embedding(10, 4, dtype="mixed_float16")
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            layer,
            keras.layers.GlobalAveragePooling1D(dtype="mixed_float16"),
            keras.layers.Dense(1, dtype="mixed_float16"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = table_of(layer)
    history = model.fit(np.array([[1, 2, 3]]), np.ones((1, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = table_of(layer)
    assert dtype_of(layer.embeddings) == "float32"
    assert not np.array_equal(after[[1, 2, 3]], before[[1, 2, 3]])
    np.testing.assert_array_equal(after[[0, 4, 5]], before[[0, 4, 5]])


# --- Sparse and ragged ids -------------------------------------------------------

DENSE = np.array([[3, 0, 0], [0, 0, 5]], dtype="int32")


def same_weights_pair(**kwargs):
    ours, theirs = Embedding(10, 4, **kwargs), keras.layers.Embedding(10, 4, **kwargs)
    ours.build()
    theirs.build()
    theirs.set_weights(ours.get_weights())
    return ours, theirs


def check_sparse(ours, theirs, sparse_ids):
    out = ours(sparse_ids)
    assert tuple(out.shape) == (2, 3, 4)
    out = to_numpy(out)
    np.testing.assert_array_equal(out, table_of(ours)[DENSE])
    np.testing.assert_array_equal(out, to_numpy(ours(DENSE)))
    np.testing.assert_array_equal(out, to_numpy(theirs(sparse_ids)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.SparseTensor is TF's")
def test_tf_sparse_ids():
    import tensorflow as tf

    ours, theirs = same_weights_pair()
    check_sparse(ours, theirs, tf.sparse.from_dense(tf.constant(DENSE)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.SparseTensor is TF's")
def test_tf_sparse_invalid_ids_raise():
    import tensorflow as tf

    sparse = tf.sparse.from_dense(tf.constant([[3, 0, 12]]))
    with pytest.raises(InvalidIdError, match=r"invalid id 12 at position \(0, 2\)"):
        Embedding(10, 4)(sparse)


@pytest.mark.skipif(BACKEND != "jax", reason="BCOO is JAX's")
def test_jax_sparse_ids():
    from jax.experimental import sparse

    ours, theirs = same_weights_pair()
    check_sparse(ours, theirs, sparse.BCOO.fromdense(DENSE))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_tf_ragged_ids():
    import tensorflow as tf

    ids = tf.ragged.constant([[1, 2, 3], [9], []])
    ours, theirs = same_weights_pair()
    out = ours(ids)
    assert isinstance(out, tf.RaggedTensor)
    assert out.shape.as_list() == [3, None, 4]
    np.testing.assert_array_equal(out.row_lengths().numpy(), [3, 1, 0])
    np.testing.assert_array_equal(out.flat_values.numpy(), table_of(ours)[[1, 2, 3, 9]])
    np.testing.assert_array_equal(
        out.flat_values.numpy(), theirs(ids).flat_values.numpy()
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_tf_ragged_ids_through_a_functional_model():
    import tensorflow as tf

    ids = tf.ragged.constant([[1, 2, 3], [9]])
    layer = Embedding(10, 4)
    inputs = keras.Input((None,), ragged=True, dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    out = model(ids)
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_array_equal(out.row_lengths().numpy(), [3, 1])
    np.testing.assert_array_equal(
        out.flat_values.numpy(), table_of(layer)[[1, 2, 3, 9]]
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_tf_ragged_invalid_ids():
    import tensorflow as tf

    with pytest.raises(InvalidIdError, match="invalid id 10 at position"):
        Embedding(10, 4)(tf.ragged.constant([[1, 2], [10]]))
    layer = Embedding(10, 4, invalid_ids="zeros")
    out = layer(tf.ragged.constant([[1, -2], [10]]))
    np.testing.assert_array_equal(
        out.flat_values.numpy(), [table_of(layer)[1], np.zeros(4), np.zeros(4)]
    )

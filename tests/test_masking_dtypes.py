import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding


def test_compute_mask():
    layer = Embedding(10, 4, mask_zero=True)
    mask = layer.compute_mask(np.array([[1, 0, 3], [0, 0, 2]]))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(mask), [[True, False, True], [False, False, True]]
    )
    assert Embedding(10, 4).compute_mask(np.array([[0, 1]])) is None


@pytest.mark.parametrize("rnn", [keras.layers.LSTM, keras.layers.GRU])
def test_mask_is_consumed_by_rnn(rnn):
    inputs = keras.Input((None,), dtype="int32")
    x = Embedding(20, 4, mask_zero=True)(inputs)
    outputs = rnn(3)(x)
    model = keras.Model(inputs, outputs)
    padded = np.array([[5, 7, 9, 0, 0]], dtype="int32")
    unpadded = np.array([[5, 7, 9]], dtype="int32")
    np.testing.assert_allclose(
        to_numpy(model(padded)), to_numpy(model(unpadded)), rtol=1e-6, atol=1e-6
    )
    # Without the mask the padding changes the answer: the test can fail.
    unmasked = keras.Model(inputs, rnn(3)(Embedding(20, 4)(inputs)))
    assert not np.allclose(
        to_numpy(unmasked(padded)), to_numpy(unmasked(unpadded)), atol=1e-6
    )


@pytest.mark.parametrize(
    ("policy", "output_dtype"),
    [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
def test_mixed_precision_policies(policy, output_dtype):
    layer = Embedding(10, 4, dtype=policy)
    out = layer(np.array([[1, 9]]))
    assert keras.backend.standardize_dtype(layer.embeddings.dtype) == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == output_dtype
    expected = ops.convert_to_numpy(
        ops.cast(ops.cast(layer.embeddings, output_dtype), "float32")
    )[[[1, 9]]]
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_global_mixed_policy():
    keras.config.set_dtype_policy("mixed_float16")
    layer = Embedding(10, 4)
    out = layer(np.array([3]))
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.embeddings.dtype) == "float32"


def test_mixed_policy_does_not_round_float_ids():
    # Ids are never cast to float16, which would turn 2049.0 into 2048.0.
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((2,))  # float32 ids, Keras's default Input dtype
    layer = Embedding(3000, 2)
    model = keras.Model(inputs, layer(inputs))
    out = model.predict(np.array([[2049.0, 5.0]], dtype="float32"), verbose=0)
    table = ops.convert_to_numpy(ops.cast(layer.embeddings, "float16"))
    np.testing.assert_array_equal(out[0], table[[2049, 5]])


def test_bfloat16_table_halves_memory():
    layer = Embedding(10, 4, dtype="bfloat16")
    out = layer(np.array([1, 2]))
    assert keras.backend.standardize_dtype(layer.embeddings.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[1, 2]])


DENSE = np.array([[3, 0, 0], [0, 0, 5]], dtype="int32")


def same_weights_pair():
    ours, theirs = Embedding(10, 4), keras.layers.Embedding(10, 4)
    ours.build()
    theirs.build()
    theirs.set_weights(ours.get_weights())
    return ours, theirs


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.SparseTensor is TF's")
def test_tf_sparse_ids():
    import tensorflow as tf

    sparse = tf.sparse.from_dense(tf.constant(DENSE))
    ours, theirs = same_weights_pair()
    out = to_numpy(ours(sparse))
    np.testing.assert_array_equal(out, table_of(ours)[DENSE])
    np.testing.assert_array_equal(out, to_numpy(theirs(sparse)))


@pytest.mark.skipif(BACKEND != "jax", reason="BCOO is JAX's")
def test_jax_sparse_ids():
    from jax.experimental import sparse

    ids = sparse.BCOO.fromdense(DENSE)
    ours, theirs = same_weights_pair()
    out = to_numpy(ours(ids))
    np.testing.assert_array_equal(out, table_of(ours)[DENSE])
    np.testing.assert_array_equal(out, to_numpy(theirs(ids)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_tf_ragged_ids():
    import tensorflow as tf

    ids = tf.ragged.constant([[1, 2, 3], [9]])
    ours, theirs = same_weights_pair()
    out = ours(ids)
    assert isinstance(out, tf.RaggedTensor)
    assert out.shape.as_list() == [2, None, 4]
    np.testing.assert_array_equal(out.flat_values.numpy(), table_of(ours)[[1, 2, 3, 9]])
    np.testing.assert_array_equal(
        out.flat_values.numpy(), theirs(ids).flat_values.numpy()
    )
    inputs = keras.Input((None,), ragged=True, dtype="int32")
    model = keras.Model(inputs, ours(inputs))
    np.testing.assert_array_equal(
        model(ids).flat_values.numpy(), out.flat_values.numpy()
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.RaggedTensor is TF's")
def test_tf_ragged_invalid_ids():
    import tensorflow as tf

    from keras_ext_embedding import InvalidIdError

    with pytest.raises(InvalidIdError, match="invalid id 10 at position"):
        Embedding(10, 4)(tf.ragged.constant([[1, 2], [10]]))
    layer = Embedding(10, 4, invalid_ids="zeros")
    out = layer(tf.ragged.constant([[1, -2], [10]]))
    np.testing.assert_array_equal(
        out.flat_values.numpy(), [table_of(layer)[1], np.zeros(4), np.zeros(4)]
    )

"""Dense training (`optimizer=None`) with repeated ids, and how rows are read.

Keras's optimizers on TensorFlow square each repetition of an id in the
`IndexedSlices` gradient of a gather on its own, so Adagrad and Adam train a
repeated id differently there than on JAX and PyTorch. Our layer's gradient
names each id once: the same table on every backend, checked here against a
float64 NumPy replay of dense Keras semantics (repetitions summed, every row
and slot stepped).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import Embedding, ReversibleEmbedding, replace_embeddings

BACKEND = keras.config.backend()
VOCAB, DIM, LENGTH, BATCH, STEPS = 30, 4, 6, 4, 3
RATE = 0.1


def batches(rng):
    # Zipf ids: every batch repeats ids, and many rows are never looked up.
    ids = np.minimum(rng.zipf(1.3, size=(STEPS * BATCH, LENGTH)), VOCAB - 1)
    targets = rng.normal(size=(STEPS * BATCH, LENGTH, DIM))
    return ids.astype("int32"), targets.astype("float32")


def table_gradient(table, ids, targets):
    """dLoss/dTable of `mse(table[ids], targets)`, repetitions summed."""
    outputs = table[ids]
    upstream = 2 * (outputs - targets) / (ids.size * DIM)
    gradient = np.zeros_like(table)
    np.add.at(gradient, ids.reshape(-1), upstream.reshape(-1, DIM))
    return gradient


def dense_replay(name, table, ids, targets):
    """Keras's dense `update_step` on every row, in float64."""
    table = table.astype("float64")
    accumulator = np.full_like(table, 0.1)
    momentum, velocity = np.zeros_like(table), np.zeros_like(table)
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        g = table_gradient(table, ids[rows], targets[rows])
        if name == "sgd":
            table = table - RATE * g
        elif name == "adagrad":
            accumulator = accumulator + g * g
            table = table - RATE * g / np.sqrt(accumulator + 1e-7)
        else:
            t = step + 1
            alpha = RATE * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            momentum = momentum + (g - momentum) * (1 - 0.9)
            velocity = velocity + (g * g - velocity) * (1 - 0.999)
            table = table - momentum * alpha / (np.sqrt(velocity) + 1e-7)
    return table


def trained(layer, name, ids, targets, jit_compile="auto"):
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), layer])
    optimizer = {"sgd": keras.optimizers.SGD, "adagrad": keras.optimizers.Adagrad}
    optimizer = optimizer.get(name, keras.optimizers.Adam)(RATE)
    model.compile(optimizer, "mse", jit_compile=jit_compile)
    model.fit(ids, targets, batch_size=BATCH, shuffle=False, verbose=0)
    return ops.convert_to_numpy(layer.embeddings)


JIT_COMPILE = [False, True] if BACKEND == "tensorflow" else ["auto"]


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_repeated_ids_train_as_the_dense_numpy_replay(name, jit_compile):
    rng = np.random.default_rng(0)
    ids, targets = batches(rng)
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    result = trained(
        Embedding(VOCAB, DIM, weights=[table]), name, ids, targets, jit_compile
    )
    # float32 against float64: Adam divides by small square roots.
    np.testing.assert_allclose(
        result, dense_replay(name, table, ids, targets), rtol=1e-5, atol=5e-6
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's IndexedSlices")
def test_tensorflow_gradient_names_each_id_once():
    import tensorflow as tf

    layer = Embedding(VOCAB, DIM)
    layer.build()
    ids = tf.constant([[3, 3, 7], [3, 0, 7]])
    weights = np.arange(2 * 3 * DIM, dtype="float32").reshape(2, 3, DIM)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids, training=True) * weights)
    (gradient,) = tape.gradient(loss, [layer.embeddings.value])
    assert isinstance(gradient, tf.IndexedSlices)
    indices = gradient.indices.numpy()
    values = gradient.values.numpy()
    nonzero = indices[np.any(values != 0, axis=1)]
    # Each id carries its summed gradient once; its repetitions carry zeros.
    assert sorted(nonzero.tolist()) == [0, 3, 7]
    dense = np.zeros((VOCAB, DIM), "float32")
    np.add.at(dense, indices, values)
    expected = np.zeros_like(dense)
    np.add.at(expected, ids.numpy().reshape(-1), weights.reshape(-1, DIM))
    np.testing.assert_array_equal(dense, expected)
    # Outside training, a plain gather (no sort) with the same rows.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer(ids)),
        ops.convert_to_numpy(layer(ids, training=True)),
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's variable reads")
def test_tensorflow_traced_lookup_reads_only_the_rows():
    # A traced gather from the tf.Variable is a ResourceGather (a sparse
    # read); one from the read tensor would copy the table once the
    # variable turned copy-on-read after a sparse optimizer update.
    import tensorflow as tf

    layer = Embedding(VOCAB, DIM)
    layer.build()
    lookup = tf.function(lambda ids: layer(ids, training=False))
    graph = lookup.get_concrete_function(tf.TensorSpec((None, LENGTH), tf.int32)).graph
    operations = graph.get_operations()
    assert "ResourceGather" in [op.type for op in operations]
    assert "GatherV2" not in [op.type for op in operations]
    # Keras's `take` reads the table for its shape; nothing consumes that
    # read (the graph's optimizer drops it). (The traced invalid-id counter,
    # another variable, is read and added to.)
    (table,) = {op.inputs[0].name for op in operations if op.type == "ResourceGather"}
    reads = [
        op
        for op in operations
        if op.type == "ReadVariableOp" and op.inputs[0].name == table
    ]
    assert reads
    assert all(not out.consumers() for op in reads for out in op.outputs)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's variable reads")
@pytest.mark.parametrize("tie_weights", [True, False])
def test_tensorflow_tied_table_is_never_read_sparsely(tie_weights):
    """A tied table is also read whole by the reverse projection: a sparse
    read (ResourceGather) in the lookup would turn it copy-on-read, and every
    projection would then copy the table (keras-hub's `generate`: twice
    Keras's time per token). An untied lookup still gathers sparsely."""
    import tensorflow as tf

    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie_weights)
    layer.build()
    step = tf.function(
        lambda ids, h: (layer(ids, training=False), layer(h, reverse=True))
    )
    graph = step.get_concrete_function(
        tf.TensorSpec((None, LENGTH), tf.int32), tf.TensorSpec((None, DIM))
    ).graph
    types = [op.type for op in graph.get_operations()]
    assert ("ResourceGather" in types) is not tie_weights
    assert ("GatherV2" in types) is tie_weights
    ids = np.array([[1, 2, 3, 4, 5, VOCAB - 1]], "int32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(step(ids, np.zeros((1, DIM), "float32"))[0]),
        ops.convert_to_numpy(layer.embeddings)[ids],
    )


def test_replace_embeddings_can_give_the_tables_their_own_optimizer():
    rng = np.random.default_rng(1)
    ids, targets = batches(rng)
    inputs = keras.Input((LENGTH,), dtype="int32")
    outputs = keras.layers.Embedding(VOCAB, DIM, name="tokens")(inputs)
    model = keras.Model(inputs, outputs)
    before = ops.convert_to_numpy(model.get_layer("tokens").embeddings)
    outputs = model.predict(ids, verbose=0)

    assert replace_embeddings(model, optimizer="adagrad") is model
    layer = model.get_layer("tokens")
    assert [w.name for w in layer.weights] == [
        "embeddings",
        "embeddings_accumulator",
        "embeddings_iteration",
    ]
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.embeddings), before)
    np.testing.assert_array_equal(model.predict(ids, verbose=0), outputs)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(ids, targets, batch_size=BATCH, shuffle=False, verbose=0)
    after = ops.convert_to_numpy(layer.embeddings)
    untouched = np.setdiff1d(np.arange(VOCAB), ids)
    moved = np.flatnonzero(np.any(after != before, axis=1))
    assert moved.tolist() == np.unique(ids).tolist()
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert float(ops.convert_to_numpy(layer.embeddings_iteration)) == STEPS

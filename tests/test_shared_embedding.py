"""SharedEmbedding: several features of one table, pooled or not, in one gather.

Each feature's output must equal what EmbeddingBag (pooled) or Embedding
(unpooled) gives on the same table; one call is one lookup, so a row-sparse
table trains from every feature in one step.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import (
    Embedding,
    EmbeddingBag,
    InvalidIdError,
    SharedEmbedding,
)

BACKEND = keras.config.backend()
VOCAB, DIM = 20, 4
HISTORY = np.array([[1, 2, 0], [0, 0, 0], [3, 3, 5]], dtype="int32")
HISTORY_WEIGHTS = np.array([[0.5, 2, 0], [0, 0, 0], [1, 1, 3]], dtype="float32")
CANDIDATE = np.array([[4], [6], [0]], dtype="int32")
QUERY_FLAT = np.array([7, 8, 9, 7], dtype="int32")
QUERY_LENGTHS = np.array([1, 3, 0], dtype="int32")
FEATURES = {"history": "mean", "candidate": None, "query": "max"}


@pytest.fixture
def table(rng):
    return rng.normal(size=(VOCAB, DIM)).astype("float32")


def inputs():
    return {"history": HISTORY, "candidate": CANDIDATE, "query": QUERY_FLAT}


def shared(table, **kwargs):
    return SharedEmbedding(
        VOCAB, DIM, features=FEATURES, mask_zero=True, weights=table, **kwargs
    )


def call(layer, **kwargs):
    return layer(
        inputs(),
        weights={"history": HISTORY_WEIGHTS},
        lengths={"query": QUERY_LENGTHS},
        **kwargs,
    )


def expected(table):
    history = EmbeddingBag(VOCAB, DIM, mask_zero=True, weights=table)
    query = EmbeddingBag(VOCAB, DIM, combiner="max", mask_zero=True, weights=table)
    return {
        "history": ops.convert_to_numpy(history(HISTORY, HISTORY_WEIGHTS)),
        "candidate": table[CANDIDATE],
        "query": ops.convert_to_numpy(query(QUERY_FLAT, lengths=QUERY_LENGTHS)),
    }


def assert_outputs_equal(outputs, reference):
    assert sorted(outputs) == sorted(reference)
    for name in reference:
        np.testing.assert_allclose(
            ops.convert_to_numpy(outputs[name]),
            reference[name],
            rtol=1e-6,
            atol=1e-7,
            err_msg=name,
        )


def test_each_feature_as_its_own_layer_gives_it(table):
    outputs = call(shared(table))
    assert_outputs_equal(outputs, expected(table))
    # By NumPy too: the weighted mean of bag 0 and the empty bag 1.
    history = ops.convert_to_numpy(outputs["history"])
    np.testing.assert_allclose(
        history[0], (0.5 * table[1] + 2 * table[2]) / 2.5, rtol=1e-6
    )
    np.testing.assert_array_equal(history[1], np.zeros(DIM))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(outputs["query"])[1], table[[7, 8, 9]].max(0)
    )


def test_unpooled_feature_carries_the_padding_mask(table):
    outputs = call(shared(table))
    mask = outputs["candidate"]._keras_mask
    np.testing.assert_array_equal(ops.convert_to_numpy(mask), CANDIDATE != 0)
    assert getattr(outputs["history"], "_keras_mask", None) is None


@pytest.mark.parametrize("mode", ["int8", "lora"])
def test_table_formats(table, mode):
    layer = shared(table)
    reference_layer = Embedding(VOCAB, DIM, weights=table)
    for each in (layer, reference_layer):
        if mode == "int8":
            each.quantize("int8")
        else:
            each.enable_lora(2)
            each.lora_embeddings_b.assign(np.full((2, DIM), 0.1, "float32"))
            each.lora_embeddings_a.assign(layer.lora_embeddings_a)
    # The rows the table gives now, as Embedding looks them up.
    rows = ops.convert_to_numpy(reference_layer(np.arange(VOCAB)))
    assert_outputs_equal(call(layer), expected(rows))


def test_functional_model_and_keras_file(table, tmp_path):
    history = keras.Input((3,), dtype="int32", name="history")
    candidate = keras.Input((1,), dtype="int32", name="candidate")
    layer = SharedEmbedding(
        VOCAB,
        DIM,
        features={"history": "sqrtn", "candidate": None},
        padding_id=5,
        weights=table,
        name="items",
    )
    outputs = layer({"history": history, "candidate": candidate})
    assert outputs["history"].shape == (None, DIM)
    assert outputs["candidate"].shape == (None, 1, DIM)
    model = keras.Model({"history": history, "candidate": candidate}, outputs)
    data = {"history": HISTORY, "candidate": CANDIDATE}
    predictions = model.predict(data, verbose=0)
    bag = EmbeddingBag(VOCAB, DIM, combiner="sqrtn", padding_id=5, weights=table)
    np.testing.assert_allclose(
        predictions["history"], ops.convert_to_numpy(bag(HISTORY)), rtol=1e-6
    )
    config = layer.get_config()
    assert config["features"] == {"history": "sqrtn", "candidate": None}
    assert config["padding_id"] == 5
    assert SharedEmbedding.from_config(config).get_config() == config
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(reloaded.get_layer("items")) is SharedEmbedding
    again = reloaded.predict(data, verbose=0)
    for name in predictions:
        np.testing.assert_array_equal(again[name], predictions[name])


def test_one_lookup_trains_a_row_sparse_table_from_every_feature(table):
    """Row-sparse SGD from both features in one step is dense SGD."""
    results = []
    for optimizer in (keras.optimizers.SGD(0.5), None):
        history = keras.Input((3,), dtype="int32", name="history")
        candidate = keras.Input((1,), dtype="int32", name="candidate")
        layer = SharedEmbedding(
            VOCAB,
            DIM,
            features={"history": "mean", "candidate": None},
            padding_id=0,
            weights=table,
            optimizer=optimizer,
        )
        outputs = layer({"history": history, "candidate": candidate})
        score = keras.layers.Dot(axes=1)(
            [outputs["history"], keras.layers.Reshape((DIM,))(outputs["candidate"])]
        )
        model = keras.Model({"history": history, "candidate": candidate}, score)
        model.compile(keras.optimizers.SGD(0.5), "mse")
        model.fit(
            {"history": HISTORY, "candidate": np.array([[4], [6], [7]])},
            np.ones((3, 1), "float32"),
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        results.append(ops.convert_to_numpy(layer.embeddings))
    row_sparse, dense = results
    np.testing.assert_allclose(row_sparse, dense, rtol=1e-5, atol=1e-6)
    moved = np.abs(row_sparse - table).sum(1) > 0
    # Rows of both features moved: the bags' and their candidates' (6 scores
    # against an empty bag: no gradient); padding and absent ids did not.
    np.testing.assert_array_equal(np.flatnonzero(moved), [1, 2, 3, 4, 5, 7])


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jit_equals_eager_and_drops_invalid_ids(table):
    import jax

    layer = shared(table)
    eager = {k: ops.convert_to_numpy(v) for k, v in call(layer).items()}

    @jax.jit
    def run(trainable, non_trainable, ids, history_weights, lengths):
        outputs, _ = layer.stateless_call(
            trainable,
            non_trainable,
            ids,
            weights={"history": history_weights},
            lengths={"query": lengths},
        )
        return outputs

    state = (
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
    )
    assert_outputs_equal(run(*state, inputs(), HISTORY_WEIGHTS, QUERY_LENGTHS), eager)
    bad = {**inputs(), "history": np.array([[1, 2, 99], [0, 0, 0], [3, 3, 5]])}
    outputs = run(*state, bad, np.ones((3, 3), "float32"), QUERY_LENGTHS)
    # The invalid id is dropped from bag 0: the mean of rows 1 and 2.
    np.testing.assert_allclose(
        outputs["history"][0], (table[1] + table[2]) / 2, rtol=1e-6
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_equals_eager(table, jit_compile):
    import tensorflow as tf

    layer = shared(table)
    eager = {k: ops.convert_to_numpy(v) for k, v in call(layer).items()}
    run = tf.function(lambda: call(layer), jit_compile=jit_compile)
    assert_outputs_equal(run(), eager)


def test_invalid_id_names_its_feature_and_bag(table):
    layer = shared(table)
    bad = {**inputs(), "history": np.array([[1, 2, 0], [0, 30, 0], [3, 3, 5]])}
    with pytest.raises(
        InvalidIdError, match="id 30 of feature 'history' in bag 1 at position 1"
    ):
        layer(bad, lengths={"query": QUERY_LENGTHS})
    bad = {**inputs(), "query": np.array([7, 8, 9, -1])}
    with pytest.raises(
        InvalidIdError, match="id -1 of feature 'query' in bag 1 at position 2"
    ):
        layer(bad, lengths={"query": QUERY_LENGTHS})


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({}, "non-empty dict"),
        ({"a": "median"}, r"`features\['a'\]` must be one of"),
        ({1: "mean"}, "names \\(strings\\)"),
        (["a"], "non-empty dict"),
    ],
)
def test_bad_features_are_refused(features, message):
    with pytest.raises(ValueError, match=message):
        SharedEmbedding(VOCAB, DIM, features=features)


def test_bad_calls_are_refused(table):
    layer = shared(table)
    with pytest.raises(ValueError, match="exactly those keys"):
        layer({"history": HISTORY})
    with pytest.raises(ValueError, match="keyed by its pooled features"):
        layer(
            inputs(),
            weights={"candidate": np.ones((3, 1))},
            lengths={"query": QUERY_LENGTHS},
        )
    with pytest.raises(ValueError, match="padding_id"):
        SharedEmbedding(VOCAB, DIM, features=FEATURES, mask_zero=True, padding_id=3)


def test_quantize_refuses_subclasses_as_keras_does():
    class Mine(SharedEmbedding):
        pass

    layer = Mine(VOCAB, DIM, features=FEATURES)
    layer.build()
    with pytest.raises(NotImplementedError):
        layer.quantize("int8")
    layer.quantize("int8", type_check=False)
    assert layer.quantization_mode == "int8"


class UpstreamMask(keras.layers.Layer):
    """Passes ids on with a mask: ids below 15 count."""

    def call(self, ids):
        return ids

    def compute_mask(self, ids, mask=None):
        return ops.less(ids, 15)


def test_masks_from_upstream_reach_each_feature_with_and_without_weights(table):
    history = keras.Input((3,), dtype="int32", name="history")
    candidate = keras.Input((1,), dtype="int32", name="candidate")
    weights = keras.Input((3,), name="weights")
    layer = SharedEmbedding(
        VOCAB, DIM, features={"history": "sum", "candidate": None}, weights=table
    )
    masked = {"history": UpstreamMask()(history), "candidate": candidate}
    for extra in ({}, {"weights": {"history": weights}}):
        outputs = layer(masked, **extra)
        model = keras.Model([history, candidate, weights], outputs["history"])
        ids = np.array([[1, 16, 2], [17, 18, 19]], "int32")
        w = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], "float32")
        got = model.predict([ids, np.array([[1], [2]], "int32"), w], verbose=0)
        scale = w if extra else np.ones_like(w)
        expected = np.stack(
            [scale[0, 0] * table[1] + scale[0, 2] * table[2], np.zeros(DIM)]
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)

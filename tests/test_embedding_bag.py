"""EmbeddingBag: pooled lookups against a float64 NumPy reference.

Every combiner (sum, mean, sqrtn, max, min), with and without per-id
weights, padding (`mask_zero`, `padding_id`), masked positions and empty
bags, for every input form (dense, flat ids with `lengths` or `offsets`, and
TensorFlow's ragged and sparse tensors, JAX's BCOO) and every table format
(float, LoRA, int8, int4 per row, int4 grouped); compiled calls equal to
eager ones; gradients; row-sparse training replayed in NumPy; invalid ids;
errors; config, saving and mixed precision.

The tiny table (20 x 4) keeps the suite fast: a compiled function serves
every combiner at once (one layer per combiner), rather than compiling once
per parameter.
"""

import json
import re

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import check_config_round_trip, dtype_of, to_numpy
from quantization_reference import dequantized_table
from test_row_sparse import Replay, Rule, assert_trained_as, mse_gradient

from keras_ext_embedding import EmbeddingBag, InvalidIdError

BACKEND = keras.config.backend()
V, D = 20, 4
COMBINERS = ["sum", "mean", "sqrtn", "max", "min"]
PAD_ID = 7
# How a layer marks padding, its constructor arguments and the padding id.
PADDINGS = {
    "none": ({}, None),
    "mask_zero": ({"mask_zero": True}, 0),
    "padding_id": ({"padding_id": PAD_ID}, PAD_ID),
}
TABLE_FORMATS = ["lora", "int8", "int4-per-row", "int4-grouped"]

# Dense bags (batch, length). Under mask_zero, bag 3 is empty; under
# padding_id=7, bag 5 is. Bag 1 repeats an id. Bag 6's weights sum to 0
# (mean gives zeros), bag 7's weights are all 0 (mean and sqrtn give zeros).
DENSE_IDS = np.array(
    [
        [1, 2, 3, 4],
        [5, 5, 9, 5],
        [6, 0, 8, 0],
        [0, 0, 0, 0],
        [7, 11, 7, 12],
        [7, 7, 7, 7],
        [13, 14, 15, 19],
        [16, 17, 18, 10],
    ],
    dtype="int32",
)
DENSE_WEIGHTS = np.array(
    [
        [0.5, 1.25, 2.0, 0.75],
        [1.5, 0.25, 1.0, 2.5],
        [1.75, 3.0, 0.5, 1.0],
        [1.0, 2.0, 3.0, 4.0],
        [0.75, 1.5, 2.25, 1.25],
        [1.0, 0.5, 1.5, 2.0],
        [1.0, -1.0, 2.0, -2.0],
        [0.0, 0.0, 0.0, 0.0],
    ],
    dtype="float32",
)
# Ragged bags for the flat, ragged and sparse forms: an empty bag (2), a
# bag of padding only under mask_zero (4), under padding_id=7 (6), weights
# summing to 0 (7) and all 0 (8).
BAGS = [[1, 2, 3, 4], [5, 5, 9], [], [6, 0, 8, 0], [0, 0], [7, 11, 7, 12], [7]]
BAGS += [[13, 14, 15, 19], [16, 17]]
BAG_WEIGHTS = [[0.5, 1.25, 2.0, 0.75], [1.5, 0.25, 1.0], [], [1.75, 3.0, 0.5, 1.0]]
BAG_WEIGHTS += [[2.0, 3.0], [0.75, 1.5, 2.25, 1.25], [1.5]]
BAG_WEIGHTS += [[1.0, -1.0, 2.0, -2.0], [0.0, 0.0]]

FORMS = ["dense", "lengths", "offsets"]
if BACKEND == "tensorflow":
    FORMS += ["ragged", "sparse"]
if BACKEND == "jax":
    FORMS += ["bcoo"]

# TensorFlow and JAX compile Model.predict/fit; PyTorch runs them eagerly.
COMPILED_BY_DEFAULT = BACKEND in ("tensorflow", "jax")


# --- The float64 NumPy reference. ---


def reference(table, bags, weights=None, combiner="mean", padding=None, kept=None):
    """One pooled vector per bag (a list of id lists), in float64.

    Ids outside the table (dropped when traced or with invalid_ids="zeros"),
    the padding id and positions where `kept` is False do not count.
    """
    vectors = np.zeros((len(bags), table.shape[1]))
    for b, ids in enumerate(bags):
        ids = np.asarray(ids, dtype="int64")
        w = np.ones(len(ids)) if weights is None else np.asarray(weights[b], "float64")
        keep = (ids >= 0) & (ids < table.shape[0])
        if padding is not None:
            keep &= ids != padding
        if kept is not None:
            keep &= np.asarray(kept[b], dtype=bool)
        ids, w = ids[keep], w[keep]
        if ids.size == 0:
            continue
        rows = table[ids] * w[:, None]
        if combiner == "sum":
            vectors[b] = rows.sum(0)
        elif combiner == "mean":
            vectors[b] = rows.sum(0) / w.sum() if w.sum() != 0 else 0.0
        elif combiner == "sqrtn":
            norm = np.sqrt(np.square(w).sum())
            vectors[b] = rows.sum(0) / norm if norm != 0 else 0.0
        elif combiner == "max":
            vectors[b] = rows.max(0)
        else:
            vectors[b] = rows.min(0)
    return vectors


def dense_reference(table, ids, weights=None, combiner="mean", padding=None, kept=None):
    """`reference` for dense ids `(..., length)`: `(..., dim)`."""
    ids = np.asarray(ids)
    flat = ids.reshape(-1, ids.shape[-1])
    rows = [list(r) for r in flat]
    w = None if weights is None else np.asarray(weights).reshape(flat.shape)
    k = None if kept is None else np.asarray(kept).reshape(flat.shape)
    out = reference(table, rows, w, combiner, padding, k)
    return out.reshape(*ids.shape[:-1], table.shape[1])


def coefficients(table, ids, weights, combiner, kept):
    """`(outputs, coef)` of dense bags `ids (batch, length)`: `coef[b, p, d]`
    is d outputs[b, d] / d table[ids[b, p], d]. `kept` marks the positions
    that count; max (min) gives the whole gradient to the first winner (the
    tests avoid ties between different rows)."""
    ids = np.asarray(ids)
    w = np.ones(ids.shape) if weights is None else np.asarray(weights, "float64")
    w = np.where(kept, w, 0.0)
    rows = table[ids]
    weighted = rows * w[..., None]
    coef = np.zeros(rows.shape)
    outputs = np.zeros((ids.shape[0], table.shape[1]))
    for b in range(ids.shape[0]):
        present = np.flatnonzero(kept[b])
        if present.size == 0:
            continue
        if combiner in ("max", "min"):
            values = weighted[b, present]
            pick = values.argmax(0) if combiner == "max" else values.argmin(0)
            for d in range(table.shape[1]):
                coef[b, present[pick[d]], d] = w[b, present[pick[d]]]
                outputs[b, d] = values[pick[d], d]
            continue
        divisor = {
            "sum": 1.0,
            "mean": w[b].sum(),
            "sqrtn": np.sqrt(np.square(w[b]).sum()),
        }[combiner]
        if divisor == 0:
            continue
        coef[b] = w[b][:, None] / divisor
        outputs[b] = weighted[b].sum(0) / divisor
    return outputs, coef


def table_gradient(ids, coef, cotangent, kept):
    """d sum(outputs * cotangent) / d table, repeated ids summed."""
    gradient = np.zeros((V, D))
    contributions = coef * cotangent[:, None, :]
    np.add.at(gradient, np.asarray(ids)[kept], contributions[kept])
    return gradient


def weights_gradient(table, ids, weights, combiner, kept, cotangent):
    """d sum(outputs * cotangent) / d weights for sum, mean and sqrtn."""
    w = np.where(kept, np.asarray(weights, "float64"), 0.0)
    rows = table[ids]
    outputs, _ = coefficients(table, ids, weights, combiner, kept)
    gradient = np.zeros(w.shape)
    for b in range(ids.shape[0]):
        if combiner == "sum":
            derivative = rows[b]
        elif combiner == "mean":
            total = w[b].sum()
            if total == 0:
                continue
            derivative = (rows[b] - outputs[b]) / total
        else:
            norm = np.sqrt(np.square(w[b]).sum())
            if norm == 0:
                continue
            derivative = (rows[b] - outputs[b] * w[b][:, None] / norm) / norm
        gradient[b] = derivative @ cotangent[b]
    return np.where(kept, gradient, 0.0)


# --- Helpers. ---


def raw(variable):
    return np.array(ops.convert_to_numpy(variable))


def weight(layer, name):
    (match,) = [w for w in layer.weights if w.name == name]
    return match


def random_table(seed=0):
    return np.random.default_rng(seed).normal(scale=0.5, size=(V, D)).astype("float32")


def make_layer(combiner="mean", padding="none", table_format="float", **kwargs):
    """A built layer with a random table in `table_format`."""
    arguments, _ = PADDINGS[padding]
    layer = EmbeddingBag(V, D, combiner=combiner, name="bag", **arguments, **kwargs)
    layer.build()
    weight(layer, "embeddings").assign(random_table())
    rng = np.random.default_rng(1)
    if table_format == "lora":
        layer.enable_lora(2, lora_alpha=4.0)
        layer.lora_embeddings_a.assign(rng.normal(size=(V, 2)).astype("float32"))
        layer.lora_embeddings_b.assign(rng.normal(size=(2, D)).astype("float32"))
    elif table_format == "int8":
        layer.quantize("int8")
    elif table_format == "int4-per-row":
        layer.quantize(
            "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=None)
        )
    elif table_format == "int4-grouped":
        layer.quantize(
            "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=2)
        )
    return layer


def reference_table(layer):
    """The table a lookup reads, in float64, from the layer's variables."""
    if layer.quantization_mode is not None:
        return dequantized_table(layer)
    table = raw(weight(layer, "embeddings")).astype("float64")
    if layer.lora_enabled:
        a = raw(layer.lora_embeddings_a).astype("float64")
        b = raw(layer.lora_embeddings_b).astype("float64")
        table = table + (layer.lora_alpha / layer.lora_rank) * (a @ b)
    return table


def flat_layout(bags, weights=None):
    """Flat ids `(n,)`, their weights, lengths and offsets (int32)."""
    lengths = np.array([len(b) for b in bags], dtype="int32")
    ids = np.array([i for b in bags for i in b], dtype="int32")
    flat_weights = None
    if weights is not None:
        flat_weights = np.array([x for w in weights for x in w], dtype="float32")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("int32")
    return ids, flat_weights, lengths, offsets


def sparse_indices(bags):
    """The `(bag, place)` index of each flat id, and the dense shape."""
    indices = np.array([(b, p) for b, bag in enumerate(bags) for p in range(len(bag))])
    return indices.reshape(-1, 2).astype("int64"), (len(bags), max(map(len, bags)))


def form_arguments(form, bags, weights=None):
    """`(inputs, kwargs)` of a call holding `bags` (and their weights) in
    `form`. The dense form takes bags of one length; "lengths" passes NumPy
    arrays, "offsets" backend tensors."""
    if form == "dense":
        ids = np.array(bags, dtype="int32")
        kwargs = {} if weights is None else {"weights": np.array(weights, "float32")}
        return ids, kwargs
    ids, flat_weights, lengths, offsets = flat_layout(bags, weights)
    kwargs = {} if weights is None else {"weights": flat_weights}
    if form == "lengths":
        return ids, {**kwargs, "lengths": lengths}
    if form == "offsets":
        kwargs = {k: ops.convert_to_tensor(v) for k, v in kwargs.items()}
        return ops.convert_to_tensor(ids), {**kwargs, "offsets": offsets}
    if form == "ragged":
        import tensorflow as tf

        ragged = tf.RaggedTensor.from_row_lengths(ids, lengths)
        if weights is not None:
            kwargs["weights"] = tf.RaggedTensor.from_row_lengths(flat_weights, lengths)
        return ragged, kwargs
    indices, shape = sparse_indices(bags)
    if form == "sparse":
        import tensorflow as tf

        if weights is not None:
            kwargs["weights"] = tf.SparseTensor(indices, flat_weights, shape)
        return tf.SparseTensor(indices, ids, shape), kwargs
    assert form == "bcoo", form
    from jax.experimental import sparse

    if weights is not None:
        kwargs["weights"] = sparse.BCOO((flat_weights, indices), shape=shape)
    return sparse.BCOO((ids, indices), shape=shape), kwargs


def form_data(form):
    """The bags and weights a form is tested on."""
    if form == "dense":
        return [list(r) for r in DENSE_IDS], [list(r) for r in DENSE_WEIGHTS]
    return BAGS, BAG_WEIGHTS


def assert_pooled(out, expected, rtol=1e-5, atol=1e-6):
    out = to_numpy(out)
    assert out.shape == expected.shape
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)


# --- 1. Every combiner, padding and form against the reference. ---


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("combiner", COMBINERS)
def test_pooling_matches_numpy(combiner, padding, form):
    layer = make_layer(combiner, padding)
    table = reference_table(layer)
    pad = PADDINGS[padding][1]
    bags, weights = form_data(form)
    for with_weights in (False, True):
        bag_weights = weights if with_weights else None
        inputs, kwargs = form_arguments(form, bags, bag_weights)
        out = layer(inputs, **kwargs)
        assert dtype_of(out) == "float32"
        assert_pooled(out, reference(table, bags, bag_weights, combiner, pad))


def with_combiner(layer, combiner):
    """A layer of `layer`'s config, table and adapters, pooling with
    `combiner`: quantizing once per table format serves every combiner."""
    clone = EmbeddingBag.from_config({**layer.get_config(), "combiner": combiner})
    clone.build()
    clone.set_weights(layer.get_weights())
    return clone


@pytest.mark.parametrize("table_format", TABLE_FORMATS)
def test_table_formats_pool_their_rows(table_format):
    base = make_layer("mean", "mask_zero", table_format)
    table = reference_table(base)
    if table_format == "lora":
        # The delta matters: the merged table is not the frozen one.
        assert not np.allclose(table, raw(weight(base, "embeddings")), atol=0.1)
    for combiner in COMBINERS:
        layer = base if combiner == "mean" else with_combiner(base, combiner)
        assert layer.combiner == combiner
        np.testing.assert_array_equal(reference_table(layer), table)
        for form in FORMS:
            bags, weights = form_data(form)
            # Without weights on dense ids only (test_pooling_matches_numpy
            # covers every form without weights).
            for bag_weights in (None, weights) if form == "dense" else (weights,):
                inputs, kwargs = form_arguments(form, bags, bag_weights)
                expected = reference(table, bags, bag_weights, combiner, 0)
                assert_pooled(layer(inputs, **kwargs), expected)


@pytest.mark.parametrize("combiner", COMBINERS)
def test_dense_ids_of_higher_rank(combiner):
    layer = make_layer(combiner, "mask_zero")
    table = reference_table(layer)
    ids = DENSE_IDS.reshape(2, 4, 4)
    weights = DENSE_WEIGHTS.reshape(2, 4, 4)
    out = layer(ops.convert_to_tensor(ids), weights=ops.convert_to_tensor(weights))
    assert tuple(out.shape) == (2, 4, D)
    assert_pooled(out, dense_reference(table, ids, weights, combiner, 0))
    # The same ids flattened to (8, 4) pool the same bags.
    np.testing.assert_array_equal(
        to_numpy(out).reshape(8, D), to_numpy(layer(DENSE_IDS, weights=DENSE_WEIGHTS))
    )


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("combiner", COMBINERS)
def test_one_dimensional_ids_are_bags_of_one(combiner, padding):
    layer = make_layer(combiner, padding)
    table = reference_table(layer)
    pad = PADDINGS[padding][1]
    ids = np.array([3, 0, PAD_ID, 19], dtype="int32")
    weights = np.array([2.0, 1.5, -0.5, -1.0], dtype="float32")
    bags = [[i] for i in ids]
    assert_pooled(layer(ids), reference(table, bags, None, combiner, pad))
    out = layer(ids, weights=weights)
    assert tuple(out.shape) == (4, D)
    expected = reference(table, bags, [[w] for w in weights], combiner, pad)
    assert_pooled(out, expected)


@pytest.mark.parametrize("combiner", ["mean", "max"])
def test_float_ids(combiner):
    """Whole float ids (keras.Input's default dtype) pool as integers; other
    floats are invalid ids (dropped with invalid_ids="zeros")."""
    layer = make_layer(combiner, "mask_zero", invalid_ids="zeros")
    table = reference_table(layer)
    ids = np.array([[1.0, 2.0, 0.0], [1.5, 3.0, 0.0], [np.nan, 0.0, 0.0]])
    bags = [[1, 2, 0], [-1, 3, 0], [-1, 0, 0]]
    for dtype in ("float32", "float64"):
        expected = reference(table, bags, None, combiner, 0)
        assert_pooled(layer(ops.convert_to_tensor(ids, dtype=dtype)), expected)
        assert_pooled(layer(ids.astype(dtype)), expected)


@pytest.mark.skipif(BACKEND != "jax", reason="BCOO is JAX's")
def test_bcoo_padding_entries_belong_to_no_bag():
    """`BCOO.fromdense(..., nse=)` pads with out-of-bounds indices."""
    from jax.experimental import sparse

    layer = make_layer("sum", "none")
    dense = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 4]], "int32")
    ids = sparse.BCOO.fromdense(dense, nse=8)
    expected = reference(reference_table(layer), [[1, 2], [], [3, 4]], combiner="sum")
    assert_pooled(layer(ids), expected)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_with_unknown_shapes():
    """A serving signature: the batch size and bag lengths unknown."""
    import tensorflow as tf

    layer = make_layer("max", "mask_zero")
    table = reference_table(layer)
    signatures = {
        "dense": [tf.TensorSpec([None, None], tf.int32)],
        "lengths": [tf.TensorSpec([None], tf.int32)] * 2,
        "ragged": [
            tf.RaggedTensorSpec([None, None], tf.int32, row_splits_dtype=tf.int32)
        ],
        "sparse": [tf.SparseTensorSpec([None, None], tf.int32)],
    }
    for form, signature in signatures.items():
        bags, _ = form_data(form)
        inputs, kwargs = form_arguments(form, bags)
        if form == "lengths":
            step = tf.function(
                lambda ids, lengths: layer(ids, lengths=lengths),
                input_signature=signature,
            )
            out = step(inputs, kwargs["lengths"])
        else:
            out = tf.function(layer, input_signature=signature)(inputs)
        assert_pooled(out, reference(table, bags, None, "max", 0))


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch has no sparse id tensors")
def test_weights_of_another_ragged_or_sparse_layout_are_refused():
    layer = make_layer("sum", "none")
    indices = np.array([[0, 0], [0, 1], [1, 0]])
    other = np.array([[0, 0], [1, 0], [1, 1]])
    values = np.array([1, 2, 3], "int32")
    weights = np.array([1.0, 2.0, 3.0], "float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        ids = tf.RaggedTensor.from_row_lengths(values, [2, 1])
        ragged_weights = tf.RaggedTensor.from_row_lengths(weights, [1, 2])
        with pytest.raises(ValueError, match="weights"):
            layer(ids, weights=ragged_weights)
        make = tf.SparseTensor
        sparse_ids = make(indices, values, (2, 2))
        sparse_weights = make(other, weights, (2, 2))
    else:
        from jax.experimental import sparse

        sparse_ids = sparse.BCOO((values, indices), shape=(2, 2))
        sparse_weights = sparse.BCOO((weights, other), shape=(2, 2))
    with pytest.raises(ValueError, match="weights"):
        layer(sparse_ids, weights=sparse_weights)


@pytest.mark.parametrize("combiner", COMBINERS)
def test_mask_argument_drops_positions(combiner):
    """Positions masked upstream (`mask=`) count nowhere, in max and min
    too; a bag masked whole (bag 0) is empty."""
    layer = make_layer(combiner, "none")
    table = reference_table(layer)
    mask = np.ones(DENSE_IDS.shape, dtype=bool)
    mask[0] = False
    mask[1, 2] = mask[4, 0] = mask[6, 1] = mask[7, 3] = False
    for weights in (None, DENSE_WEIGHTS):
        kwargs = {} if weights is None else {"weights": weights}
        out = layer(DENSE_IDS, mask=mask, **kwargs)
        expected = dense_reference(table, DENSE_IDS, weights, combiner, kept=mask)
        assert_pooled(out, expected)
        np.testing.assert_array_equal(to_numpy(out)[0], np.zeros(D))


class UpstreamMask(keras.layers.Layer):
    """Passes ids on with a Keras mask: ids below 15 count."""

    def call(self, ids):
        return ops.multiply(ids, 1)

    def compute_mask(self, ids, mask=None):
        return ops.less(ids, 15)


MASKED_IDS = np.array([[4, 15, 3, 16], [17, 18, 19, 16], [1, 2, 0, 9]], "int32")
MASK_WEIGHTS = np.array([[1.0, 2.0, 3.0, 4.0]] * 3, dtype="float32")


def test_keras_mask_from_the_layer_before_is_honoured():
    layer = make_layer("sum", "none")
    ids = keras.Input((4,), dtype="int32")
    model = keras.Model(ids, layer(UpstreamMask()(ids)))
    expected = dense_reference(
        reference_table(layer), MASKED_IDS, combiner="sum", kept=MASKED_IDS < 15
    )
    assert_pooled(model.predict(MASKED_IDS, verbose=0), expected)
    assert_pooled(model(MASKED_IDS), expected)


def test_keras_mask_from_the_layer_before_is_honoured_with_weights():
    layer = make_layer("sum", "none")
    ids = keras.Input((4,), dtype="int32")
    weights = keras.Input((4,))
    model = keras.Model([ids, weights], layer(UpstreamMask()(ids), weights=weights))
    expected = dense_reference(
        reference_table(layer),
        MASKED_IDS,
        MASK_WEIGHTS,
        combiner="sum",
        kept=MASKED_IDS < 15,
    )
    assert_pooled(model.predict([MASKED_IDS, MASK_WEIGHTS], verbose=0), expected)


class SeesMask(keras.layers.Layer):
    """Records the mask Keras hands it."""

    def __init__(self):
        super().__init__()
        self.supports_masking = True
        self.seen = "not called"

    def call(self, inputs, mask=None):
        self.seen = mask
        return inputs


def test_output_carries_no_mask():
    """The bag axis is pooled away: no mask reaches the next layer, neither
    from padding nor from a mask upstream."""
    layer = EmbeddingBag(V, D, mask_zero=True)
    assert layer.compute_mask(DENSE_IDS, ops.not_equal(DENSE_IDS, 0)) is None
    sees = SeesMask()
    ids = keras.Input((4,), dtype="int32")
    model = keras.Model(ids, sees(layer(UpstreamMask()(ids))))
    model(MASKED_IDS)
    assert sees.seen is None


# --- Empty bags and empty batches. ---


@pytest.mark.parametrize("combiner", COMBINERS)
def test_empty_bags_give_zeros(combiner):
    layer = make_layer(combiner, "mask_zero")
    checks = [
        # No position at all (length 0).
        (layer(np.zeros((3, 0), "int32")), (3, D)),
        (layer(np.zeros((3, 0), "int32"), weights=np.zeros((3, 0))), (3, D)),
        # Only padding.
        (layer(np.zeros((2, 3), "int32"), weights=np.ones((2, 3))), (2, D)),
        # Flat ids without any id: every bag is empty.
        (layer(np.zeros((0,), "int32"), lengths=np.zeros((3,), "int32")), (3, D)),
        (layer(np.zeros((0,), "int32"), offsets=np.zeros((4,), "int32")), (3, D)),
    ]
    for out, shape in checks:
        assert tuple(out.shape) == shape
        np.testing.assert_array_equal(to_numpy(out), np.zeros(shape))


@pytest.mark.parametrize("form", ["dense", "flat"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_empty_batch(combiner, form):
    layer = make_layer(combiner, "mask_zero")
    if form == "dense":
        out = layer(np.zeros((0, 3), "int32"))
    else:
        out = layer(np.zeros((0,), "int32"), lengths=np.zeros((0,), "int32"))
    assert tuple(out.shape) == (0, D)


# --- Invalid ids. ---


def invalid_message(value, where, name="bag"):
    return re.escape(
        f"Layer '{name}' received an invalid id {value} {where}. Ids must be "
        f"whole numbers in [0, {V - 1}] (input_dim={V})"
    )


def _eager_invalid_cases():
    """`(make, value, where)`: `make()` gives the call's inputs and kwargs."""
    flat = np.array([1, 2, 3, 4, 30, 5], dtype="int32")
    lengths = np.array([2, 0, 3, 1], dtype="int32")
    offsets = np.array([0, 2, 2, 5, 6], dtype="int32")
    in_bag_2 = "in bag 2 at position 2"
    tensor = ops.convert_to_tensor
    cases = {
        "dense": (
            lambda: (np.array([[1, 2, 3], [4, 5, 30]]), {}),
            30,
            "in bag 1 at position 2",
        ),
        "dense-tensor": (
            lambda: (tensor(np.array([[1, 2, 3], [4, 5, -1]], "int32")), {}),
            -1,
            "in bag 1 at position 2",
        ),
        "rank-3": (
            lambda: (np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 20], [1, 1, 1]]]), {}),
            20,
            "in bag (1, 0) at position 2",
        ),
        "one-dimensional": (
            lambda: (np.array([1, 30, 2]), {}),
            30,
            "in bag 1 at position 0",
        ),
        "lengths": (lambda: (flat, {"lengths": lengths}), 30, in_bag_2),
        "lengths-tensor": (
            lambda: (tensor(flat), {"lengths": tensor(lengths)}),
            30,
            in_bag_2,
        ),
        "offsets": (lambda: (flat, {"offsets": offsets}), 30, in_bag_2),
        "offsets-tensor": (
            lambda: (tensor(flat), {"offsets": tensor(offsets)}),
            30,
            in_bag_2,
        ),
        # `lengths` passed positionally, after `weights`.
        "lengths-positional": (
            lambda: (flat, {"args": (None, tensor(lengths))}),
            30,
            in_bag_2,
        ),
    }
    indices = np.array([[0, 0], [0, 1], [2, 0], [2, 1], [2, 2], [3, 0]])
    if BACKEND == "tensorflow":

        def ragged():
            import tensorflow as tf

            return tf.RaggedTensor.from_row_lengths(flat, lengths), {}

        def tf_sparse():
            import tensorflow as tf

            return tf.SparseTensor(indices, flat, (4, 3)), {}

        cases["ragged"] = (ragged, 30, in_bag_2)
        cases["sparse"] = (tf_sparse, 30, in_bag_2)
    if BACKEND == "jax":

        def bcoo():
            from jax.experimental import sparse

            return sparse.BCOO((flat, indices), shape=(4, 3)), {}

        cases["bcoo"] = (bcoo, 30, in_bag_2)
    return cases


EAGER_INVALID = _eager_invalid_cases()


def call_case(layer, inputs, kwargs):
    kwargs = dict(kwargs)
    args = kwargs.pop("args", ())
    return layer(inputs, *args, **kwargs)


@pytest.mark.parametrize("case", list(EAGER_INVALID))
def test_eager_invalid_id_names_its_bag(case):
    make, value, where = EAGER_INVALID[case]
    layer = make_layer("max", "mask_zero")
    inputs, kwargs = make()
    with pytest.raises(InvalidIdError, match=invalid_message(value, where)):
        call_case(layer, inputs, kwargs)
    # The layer works on after the error.
    assert tuple(layer(DENSE_IDS).shape) == (8, D)


# Bags holding invalid ids (-1, 25, 20): dropped when traced or with
# invalid_ids="zeros". A bag of invalid ids only is empty (bag 3).
INVALID_DENSE_IDS = DENSE_IDS.copy()
INVALID_DENSE_IDS[0, 1] = -1
INVALID_DENSE_IDS[4, 2] = 25
INVALID_DENSE_IDS[2] = [20, -3, 8, 21]
INVALID_BAGS = [[1, -1, 3, 4], [5, 5, 9], [], [25, 20], [6, 0, 8, 0], [7, -2, 7]]
INVALID_BAGS += [[13, 14, 15, 19], [16, 17]]
INVALID_BAG_WEIGHTS = [[0.5, 1.25, 2.0, 0.75], [1.5, 0.25, 1.0], [], [2.0, 3.0]]
INVALID_BAG_WEIGHTS += [[1.75, 3.0, 0.5, 1.0], [0.75, 1.5, 2.25]]
INVALID_BAG_WEIGHTS += [[1.0, -1.0, 2.0, -2.0], [0.0, 0.0]]


def invalid_data(form):
    """Bags with invalid ids, their weights and the number of invalid ids."""
    if form == "dense":
        bags = [list(r) for r in INVALID_DENSE_IDS]
        weights = [list(r) for r in DENSE_WEIGHTS]
    else:
        bags, weights = INVALID_BAGS, INVALID_BAG_WEIGHTS
    count = sum(not 0 <= i < V for bag in bags for i in bag)
    return bags, weights, count


def valid_like(bags):
    """The same layout with every invalid id replaced by a valid one."""
    return [[i % V for i in bag] for bag in bags]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("combiner", COMBINERS)
def test_zeros_mode_drops_invalid_ids_from_their_bag(combiner, form):
    layer = make_layer(combiner, "mask_zero", invalid_ids="zeros")
    table = reference_table(layer)
    bags, weights, _ = invalid_data(form)
    for bag_weights in (None, weights):
        inputs, kwargs = form_arguments(form, bags, bag_weights)
        expected = reference(table, bags, bag_weights, combiner, 0)
        assert_pooled(layer(inputs, **kwargs), expected)


# --- 2. Compiled calls equal eager ones. ---


def combiner_layers(padding="mask_zero", **kwargs):
    """One built layer per combiner, with the same table."""
    layers = []
    for combiner in COMBINERS:
        arguments, _ = PADDINGS[padding]
        layer = EmbeddingBag(V, D, combiner=combiner, **arguments, **kwargs)
        layer.build()
        weight(layer, "embeddings").assign(random_table())
        layers.append(layer)
    return layers


def check_compiled(layers, run, forms, padding="mask_zero"):
    """`run(calls)` calls every layer compiled on each form's `(inputs,
    kwargs)` (one compiled function for them all) and returns the outputs
    `{form: [one per layer]}` and the traced invalid-id count of each layer.
    Valid ids give the eager outputs; invalid ones are dropped and counted.

    With weights only, for one compilation per test: without weights, flat
    bags pool as with weights (the layer weighs each position by whether it
    counts), and dense ones are compiled by `test_predict_equals_eager`.
    """
    pad = PADDINGS[padding][1]
    table = reference_table(layers[0])
    data = {form: invalid_data(form) for form in forms}

    calls = {
        form: form_arguments(form, valid_like(bags), weights)
        for form, (bags, weights, _) in data.items()
    }
    outputs, counts = run(calls)
    for form, (inputs, kwargs) in calls.items():
        for layer, out in zip(layers, outputs[form], strict=True):
            eager = layer(inputs, **kwargs)
            np.testing.assert_allclose(
                to_numpy(out), to_numpy(eager), rtol=1e-6, atol=1e-7, err_msg=form
            )
    assert counts == [0] * len(layers)

    calls = {
        form: form_arguments(form, bags, weights)
        for form, (bags, weights, _) in data.items()
    }
    outputs, counts = run(calls)
    for form, (bags, weights, _) in data.items():
        for combiner, out in zip(COMBINERS, outputs[form], strict=True):
            assert_pooled(out, reference(table, bags, weights, combiner, pad))
    total = sum(count for _, _, count in data.values())
    assert counts == [total] * len(layers)


def dense_or_sparse(x):
    """A BCOO as it is, anything else as a NumPy array."""
    return x if hasattr(x, "indices") else np.asarray(x)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jax_jit_of_stateless_call():
    import jax

    layers = combiner_layers()
    names = [v.name for v in layers[0].non_trainable_variables]
    counter = names.index("traced_invalid_ids")

    @jax.jit
    def step(variables, calls):
        outputs = {form: [] for form in calls}
        counts = []
        for layer, (trainable, state) in zip(layers, variables, strict=True):
            for form, (inputs, kwargs) in calls.items():
                out, state = layer.stateless_call(
                    trainable, state, inputs, training=True, **kwargs
                )
                outputs[form].append(out)
            counts.append(state[counter])
        return outputs, counts

    def run(calls):
        variables = [
            (
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables],
            )
            for layer in layers
        ]
        # Flat ids keep static shapes: their sizes, never their values.
        calls = {
            form: (
                dense_or_sparse(inputs),
                {k: dense_or_sparse(v) for k, v in kwargs.items()},
            )
            for form, (inputs, kwargs) in calls.items()
        }
        outputs, counts = step(variables, calls)
        return outputs, [int(count) for count in counts]

    check_compiled(layers, run, FORMS)


def tensor_or_composite(x):
    """A ragged or sparse tensor as it is, anything else as a tf.Tensor."""
    import tensorflow as tf

    if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
        return x
    return tf.convert_to_tensor(x)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
@pytest.mark.parametrize("jit_compile", [False, True], ids=lambda j: f"jit={j}")
def test_tf_function(jit_compile):
    import tensorflow as tf

    layers = combiner_layers()

    @tf.function(jit_compile=jit_compile)
    def step(calls):
        return {
            form: [layer(inputs, training=True, **kwargs) for layer in layers]
            for form, (inputs, kwargs) in calls.items()
        }

    def run(calls):
        # The counts add up: the first run (valid ids) leaves them at 0.
        calls = {
            form: (
                tensor_or_composite(inputs),
                {k: tensor_or_composite(v) for k, v in kwargs.items()},
            )
            for form, (inputs, kwargs) in calls.items()
        }
        outputs = step(calls)
        return outputs, [layer.traced_invalid_ids for layer in layers]

    check_compiled(layers, run, FORMS)


def predict_model(layers, length=4):
    ids = keras.Input((length,), dtype="int32")
    return keras.Model(ids, [layer(ids) for layer in layers])


def test_predict_equals_eager():
    layers = combiner_layers()
    model = predict_model(layers)
    outputs = model.predict(DENSE_IDS, batch_size=3, verbose=0)
    for layer, out in zip(layers, outputs, strict=True):
        assert out.dtype == np.float32
        np.testing.assert_allclose(
            out, to_numpy(layer(DENSE_IDS)), rtol=1e-6, atol=1e-7
        )


def test_predict_with_invalid_ids():
    """Compiled (TensorFlow, JAX): invalid ids dropped from their bags and
    counted; eager (PyTorch): the error names the bag."""
    layers = combiner_layers()
    model = predict_model(layers)
    bags, _, count = invalid_data("dense")
    if not COMPILED_BY_DEFAULT:
        with pytest.raises(InvalidIdError, match="in bag 0 at position 1"):
            model.predict(INVALID_DENSE_IDS, verbose=0)
        return
    outputs = model.predict(INVALID_DENSE_IDS, verbose=0)
    table = reference_table(layers[0])
    for combiner, layer, out in zip(COMBINERS, layers, outputs, strict=True):
        assert_pooled(out, reference(table, bags, None, combiner, 0))
        assert layer.traced_invalid_ids == count


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="fit is eager on PyTorch")
def test_compiled_fit_with_invalid_ids_reports_their_count():
    layer = make_layer("mean", "mask_zero")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    _, _, count = invalid_data("dense")
    with pytest.raises(InvalidIdError, match=f"looked up {count} invalid ids"):
        model.fit(INVALID_DENSE_IDS, np.ones((8, D), "float32"), verbose=0)
    assert np.isfinite(raw(weight(layer, "embeddings"))).all()


# --- 3. Gradients. ---

# Dense bags without the all-zero-weights bag (see the sqrtn test below),
# with padding (mask_zero) and masked positions that must get no gradient.
GRAD_IDS = DENSE_IDS[:7]
GRAD_WEIGHTS = DENSE_WEIGHTS[:7]
GRAD_MASK = np.ones(GRAD_IDS.shape, dtype=bool)
GRAD_MASK[0, 2] = GRAD_MASK[4, 1] = GRAD_MASK[1, 0] = False
COTANGENT = np.random.default_rng(2).normal(size=(len(GRAD_IDS), D))


def backend_gradients(layer, ids, weights, cotangent, **kwargs):
    """d sum(layer(ids, weights=weights, **kwargs) * cotangent) / d (table,
    weights), with the backend's own autodiff, as float64 NumPy. The
    weights' gradient is None when `weights` is None."""
    cotangent = cotangent.astype("float32")
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        state = [v.value for v in layer.non_trainable_variables]

        def loss(table, w):
            out, _ = layer.stateless_call(
                [table], state, ids, weights=w, training=True, **kwargs
            )
            return jnp.sum(out * cotangent)

        table = layer.trainable_variables[0].value
        if weights is None:
            return np.asarray(jax.grad(loss)(table, None), "float64"), None
        grads = jax.grad(loss, argnums=(0, 1))(table, jnp.asarray(weights))
        return tuple(np.asarray(g, "float64") for g in grads)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        table = layer.trainable_variables[0].value
        w = None if weights is None else tf.constant(weights)
        with tf.GradientTape() as tape:
            if w is not None:
                tape.watch(w)
            out = layer(ids, weights=w, training=True, **kwargs)
            loss = tf.reduce_sum(out * cotangent)
        sources = [table] if w is None else [table, w]
        grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, sources)]
        return grads[0].astype("float64"), None if w is None else grads[1]
    import torch

    table = layer.trainable_variables[0].value
    table.grad = None  # PyTorch accumulates gradients.
    w = None if weights is None else torch.tensor(weights, requires_grad=True)
    out = layer(ids, weights=w, training=True, **kwargs)
    (out * torch.tensor(cotangent)).sum().backward()
    table_grad = table.grad.numpy().astype("float64")
    return table_grad, None if w is None else w.grad.numpy().astype("float64")


def padded(bags, weights, pad=0, length=4):
    """Ragged bags as dense `(ids, weights, kept)` padded with `pad`."""
    ids = np.full((len(bags), length), pad, dtype="int32")
    w = np.zeros((len(bags), length), dtype="float32")
    kept = np.zeros((len(bags), length), dtype=bool)
    for b, (bag, bag_weights) in enumerate(zip(bags, weights, strict=True)):
        ids[b, : len(bag)] = bag
        w[b, : len(bag)] = bag_weights
        kept[b, : len(bag)] = np.asarray(bag) != pad
    return ids, w, kept


def extreme_weights_gradient(table, ids, weights, combiner, kept, cotangent):
    """d sum(outputs * cotangent) / d weights for max and min (no ties)."""
    _, coef = coefficients(table, ids, weights, combiner, kept)
    winners = coef != 0
    return np.einsum("bpd,bpd,bd->bp", winners, table[ids], cotangent)


@pytest.mark.parametrize("form", ["dense", "lengths"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_gradients_match_numpy(combiner, form):
    """The table's gradient (dense training: rows of padding and masked
    positions get none; max and min give each output dimension's gradient
    to its winning row) and the weights' gradient."""
    layer = make_layer(combiner, "mask_zero")
    table = reference_table(layer)
    if form == "dense":
        ids, weights, kept = GRAD_IDS, GRAD_WEIGHTS, GRAD_MASK & (GRAD_IDS != 0)
        kwargs = {"mask": GRAD_MASK}
        cotangent = COTANGENT
    else:
        bags, bag_weights = BAGS[:-1], BAG_WEIGHTS[:-1]
        ids, weights, kept = padded(bags, bag_weights)
        flat_ids, _, lengths, _ = flat_layout(bags, bag_weights)
        kwargs = {"lengths": lengths}
        cotangent = np.random.default_rng(3).normal(size=(len(bags), D))

    def flat(x):
        """Per-position values of the call: dense, or the ragged positions."""
        if form == "dense":
            return x
        present = np.arange(ids.shape[1]) < lengths[:, None]
        return x[present]

    call_ids = ids if form == "dense" else flat_ids
    for with_weights in (False, True):
        w = weights if with_weights else None
        call_weights = None if w is None else flat(w)
        table_grad, weights_grad = backend_gradients(
            layer, call_ids, call_weights, cotangent, **kwargs
        )
        _, coef = coefficients(table, ids, w, combiner, kept)
        np.testing.assert_allclose(
            table_grad,
            table_gradient(ids, coef, cotangent, kept),
            rtol=1e-5,
            atol=1e-6,
        )
        # Only rows of kept ids receive a gradient (padding row 0 none).
        assert not table_grad[0].any()
        untouched = np.setdiff1d(np.arange(V), ids[kept])
        assert not table_grad[untouched].any()
        if w is None:
            continue
        if combiner in ("max", "min"):
            expected = extreme_weights_gradient(
                table, ids, w, combiner, kept, cotangent
            )
        else:
            expected = weights_gradient(table, ids, w, combiner, kept, cotangent)
        np.testing.assert_allclose(weights_grad, flat(expected), rtol=1e-5, atol=1e-6)


def test_sqrtn_gradient_of_all_zero_weights_is_finite():
    layer = make_layer("sqrtn", "mask_zero")
    ids = DENSE_IDS[6:8]
    weights = DENSE_WEIGHTS[6:8]  # Bag 1's weights are all 0.
    cotangent = COTANGENT[:2]
    table_grad, weights_grad = backend_gradients(layer, ids, weights, cotangent)
    assert np.isfinite(table_grad).all()
    assert np.isfinite(weights_grad).all(), weights_grad
    kept = np.ones(ids.shape, dtype=bool)
    expected = weights_gradient(
        reference_table(layer), ids, weights, "sqrtn", kept, cotangent
    )
    np.testing.assert_allclose(weights_grad, expected, rtol=1e-5, atol=1e-6)


# --- 4. Training with `optimizer=`, replayed in NumPy. ---

# -1 marks padding, replaced by the layer's padding id. Bag 1 repeats an
# id, bag 2 is empty; ids 9, 10, 12..19 are never looked up.
FIT_BAGS = np.array(
    [[1, 2, 2, -1], [3, 3, 3, 4], [-1, -1, -1, -1], [5, 1, -1, -1], [6, 8, 2, 11]]
)
FIT_STEPS = 3
FIT_CASES = {
    "sum-sgd": (
        "sum",
        "mask_zero",
        lambda: keras.optimizers.SGD(0.5),
        Rule("sgd", {"learning_rate": 0.5}),
    ),
    "mean-adam-string": ("mean", "mask_zero", lambda: "adam", Rule("adam")),
    "sqrtn-adam": (
        "sqrtn",
        "padding_id",
        lambda: keras.optimizers.Adam(0.05),
        Rule("adam", {"learning_rate": 0.05}),
    ),
    "max-sgd-string": ("max", "padding_id", lambda: "sgd", Rule("sgd")),
    "min-adam": (
        "min",
        "mask_zero",
        lambda: keras.optimizers.Adam(0.05, beta_1=0.8),
        Rule("adam", {"learning_rate": 0.05, "beta_1": 0.8}),
    ),
    # optimizer=None: the model's SGD trains the table densely.
    "mean-dense-sgd": ("mean", "mask_zero", None, Rule("sgd", {"learning_rate": 0.5})),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_matches_numpy_replay(case):
    combiner, padding, make_optimizer, rule = FIT_CASES[case]
    arguments, pad = PADDINGS[padding]
    ids = np.where(FIT_BAGS < 0, pad, FIT_BAGS).astype("int32")
    kept = FIT_BAGS >= 0
    targets = np.random.default_rng(4).normal(size=(len(ids), D)).astype("float32")
    table = random_table()
    row_sparse = make_optimizer is not None
    layer = EmbeddingBag(
        V,
        D,
        combiner=combiner,
        optimizer=make_optimizer() if row_sparse else None,
        name="bag",
        **arguments,
    )
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    model_rate = 0.0 if row_sparse else rule.hyper["learning_rate"]
    model.compile(optimizer=keras.optimizers.SGD(model_rate), loss="mse")
    weight(layer, "embeddings").assign(table)

    model.fit(
        ids, targets, batch_size=len(ids), epochs=FIT_STEPS, shuffle=False, verbose=0
    )

    reference = Replay(rule, table)
    for _ in range(FIT_STEPS):
        outputs, coef = coefficients(reference.values, ids, None, combiner, kept)
        gradient = coef * mse_gradient(outputs, targets)[:, None, :]
        reference.step(ids, gradient, touched=kept)
    if row_sparse:
        assert_trained_as(layer, reference)
    else:
        np.testing.assert_allclose(
            raw(weight(layer, "embeddings")), reference.values, rtol=1e-5, atol=1e-6
        )
    # The padding row and rows the batch never looked up keep their bits.
    untouched = np.setdiff1d(np.arange(V), ids[kept])
    assert pad in untouched
    trained = raw(weight(layer, "embeddings"))
    np.testing.assert_array_equal(trained[untouched], table[untouched])
    assert not np.array_equal(trained, table)


# --- 5. Config, saving, shapes and dtypes. ---


def test_config_round_trip_keeps_combiner_and_padding_id():
    layer = EmbeddingBag(V, D, combiner="max", padding_id=3, name="bag")
    config = layer.get_config()
    assert (config["combiner"], config["padding_id"]) == ("max", 3)
    check_config_round_trip(layer)
    clone = EmbeddingBag.from_config(config)
    assert (clone.combiner, clone.padding_id, clone.mask_zero) == ("max", 3, False)

    # As keras-rs EmbedReduce's config: no padding_id key when none is named.
    for layer in (EmbeddingBag(V, D), EmbeddingBag(V, D, mask_zero=True)):
        config = layer.get_config()
        assert config["combiner"] == "mean"
        assert "padding_id" not in config
        check_config_round_trip(layer)
    clone = EmbeddingBag.from_config(EmbeddingBag(V, D, mask_zero=True).get_config())
    assert (clone.mask_zero, clone.padding_id) == (True, None)
    # mask_zero=True with padding_id=0 names one padding id twice: accepted.
    assert (
        EmbeddingBag(V, D, mask_zero=True, padding_id=0).get_config()["padding_id"] == 0
    )


def test_numpy_integer_padding_id_gives_a_json_config():
    layer = EmbeddingBag(V, D, padding_id=np.int64(3))
    config = json.loads(json.dumps(layer.get_config()))
    assert config["padding_id"] == 3


@pytest.mark.parametrize("table_format", ["float", "lora", "int8"])
def test_keras_file_round_trip(table_format, tmp_path):
    layer = make_layer("sqrtn", "padding_id", table_format)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    expected = model.predict(DENSE_IDS, verbose=0)
    assert_pooled(
        expected,
        dense_reference(reference_table(layer), DENSE_IDS, None, "sqrtn", PAD_ID),
    )
    path = tmp_path / "bag.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bag = loaded.get_layer("bag")
    assert type(bag) is EmbeddingBag
    assert (bag.combiner, bag.padding_id) == ("sqrtn", PAD_ID)
    assert bag.lora_enabled is (table_format == "lora")
    assert bag.quantization_mode == (None if table_format != "int8" else "int8")
    np.testing.assert_array_equal(loaded.predict(DENSE_IDS, verbose=0), expected)
    np.testing.assert_array_equal(
        to_numpy(bag(DENSE_IDS, weights=DENSE_WEIGHTS)),
        to_numpy(layer(DENSE_IDS, weights=DENSE_WEIGHTS)),
    )


def test_output_shapes_and_specs():
    layer = EmbeddingBag(V, D, name="bag")
    for shape, expected in [
        ((None, 5), (None, D)),
        ((2, 3, 5), (2, 3, D)),
        ((None,), (None, D)),
        ((None, None), (None, D)),
    ]:
        assert layer.compute_output_shape(shape) == expected
        out = layer(keras.KerasTensor(shape, dtype="int32"))
        assert (tuple(out.shape), out.dtype) == (expected, "float32")
        out = layer(
            keras.KerasTensor(shape, dtype="int32"),
            weights=keras.KerasTensor(shape),
        )
        assert tuple(out.shape) == expected
    assert layer.compute_output_shape((12,), lengths_shape=(3,)) == (3, D)
    flat = keras.KerasTensor((None,), dtype="int32")
    for kwargs, expected in [
        ({"lengths": keras.KerasTensor((3,), dtype="int32")}, (3, D)),
        ({"lengths": keras.KerasTensor((None,), dtype="int32")}, (None, D)),
        ({"offsets": keras.KerasTensor((4,), dtype="int32")}, (3, D)),
        ({"offsets": keras.KerasTensor((None,), dtype="int32")}, (None, D)),
    ]:
        out = layer(flat, **kwargs)
        assert (tuple(out.shape), out.dtype) == (expected, "float32")
        spec = layer.compute_output_spec(flat, **kwargs)
        assert tuple(spec.shape) == expected
    # The eager outputs have the shapes announced.
    assert tuple(layer(np.ones((2, 3, 5), "int32")).shape) == (2, 3, D)
    flat_ids = np.ones((6,), "int32")
    assert tuple(layer(flat_ids, lengths=np.array([1, 2, 3])).shape) == (3, D)
    assert tuple(layer(flat_ids, offsets=np.array([0, 1, 3, 6])).shape) == (3, D)


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch has no sparse id inputs")
@pytest.mark.parametrize("kind", ["ragged", "sparse"])
def test_functional_model_on_ragged_or_sparse_input(kind):
    if kind == "ragged" and BACKEND != "tensorflow":
        pytest.skip("ragged inputs are TensorFlow's")
    layers = combiner_layers(padding="padding_id")
    if kind == "ragged":
        inputs = keras.Input((None,), ragged=True, dtype="int32")
    else:
        inputs = keras.Input((4,), sparse=True, dtype="int32")
    model = keras.Model(inputs, [layer(inputs) for layer in layers])
    assert [tuple(out.shape) for out in model.outputs] == [(None, D)] * 5
    form = {"sparse": "sparse" if BACKEND == "tensorflow" else "bcoo"}.get(kind, kind)
    ids, _ = form_arguments(form, BAGS)
    table = reference_table(layers[0])
    outputs = model.predict(ids, verbose=0)
    for combiner, out in zip(COMBINERS, outputs, strict=True):
        assert_pooled(out, reference(table, BAGS, None, combiner, PAD_ID))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    compute = policy.removeprefix("mixed_")
    layers = combiner_layers(dtype=policy)
    table = reference_table(layers[0])
    for combiner, layer in zip(COMBINERS, layers, strict=True):
        assert [dtype_of(v) for v in layer.weights] == ["float32"]
        symbolic = layer(keras.Input((4,), dtype="int32"))
        assert symbolic.dtype == compute
        for form in ("dense", "lengths"):
            bags, weights = form_data(form)
            inputs, kwargs = form_arguments(form, bags, weights)
            out = layer(inputs, **kwargs)
            assert dtype_of(out) == compute
            expected = reference(table, bags, weights, combiner, 0)
            assert_pooled(out, expected, rtol=2e-2, atol=2e-2)


# --- Errors. ---


def _error_cases():
    """`(make, error, message)`: `make()` raises `error` with `message`."""

    def bag(**kwargs):
        return EmbeddingBag(V, D, name="bag", **kwargs)

    flat = np.arange(5, dtype="int32")
    padding_message = (
        "`padding_id` must be an id of the table, an integer in [0, 19] "
        "(input_dim=20). Received: padding_id={} (of type {})."
    )
    offsets_message = (
        "Layer 'bag' received `offsets` {} for 5 flat ids. Offsets hold "
        "batch_size + 1 nondecreasing entries"
    )
    cases = {
        "combiner": (
            lambda: bag(combiner="median"),
            "`combiner` must be one of ('sum', 'mean', 'sqrtn', 'max', 'min'). "
            "Received: combiner='median'.",
        ),
        "padding-bool": (
            lambda: bag(padding_id=True),
            padding_message.format("True", "bool"),
        ),
        "padding-too-large": (
            lambda: bag(padding_id=20),
            padding_message.format("20", "int"),
        ),
        "padding-negative": (
            lambda: bag(padding_id=-1),
            padding_message.format("-1", "int"),
        ),
        "padding-float": (
            lambda: bag(padding_id=3.0),
            padding_message.format("3.0", "float"),
        ),
        "padding-and-mask-zero": (
            lambda: bag(mask_zero=True, padding_id=3),
            "`mask_zero=True` makes 0 the padding id, and `padding_id` names "
            "another: a layer has one padding id. Received: mask_zero=True, "
            "padding_id=3. Remove one of the two arguments.",
        ),
        "scalar-ids": (
            lambda: bag()(np.array(3, dtype="int32")),
            "Layer 'bag' pools bags of ids and received a scalar id. Pass ids "
            "of shape (batch, length), or (batch,) for bags of one id.",
        ),
        "scalar-tensor-ids": (
            lambda: bag()(ops.convert_to_tensor(3)),
            "Layer 'bag' pools bags of ids and received a scalar id.",
        ),
        "scalar-shape": (
            lambda: bag().compute_output_shape(()),
            "Layer 'bag' pools bags of ids and received a scalar id.",
        ),
        "weights-shape": (
            lambda: bag()(DENSE_IDS, weights=np.ones((8, 3), "float32")),
            "Layer 'bag' received `weights` of shape (8, 3) for ids of shape "
            "(8, 4): each id has one entry, so the shapes must be equal.",
        ),
        "weights-rank": (
            lambda: bag()(DENSE_IDS, weights=np.ones((8, 4, 1), "float32")),
            "received `weights` of shape (8, 4, 1) for ids of shape (8, 4)",
        ),
        "flat-weights-shape": (
            lambda: bag()(flat, weights=np.ones(6, "float32"), lengths=[2, 3]),
            "received `weights` of shape (6,) for flat ids of shape (5,)",
        ),
        "mask-shape": (
            lambda: bag()(DENSE_IDS, mask=np.ones((8, 3), dtype=bool)),
            "received `mask` of shape (8, 3) for ids of shape (8, 4)",
        ),
        "lengths-and-offsets": (
            lambda: bag()(flat, lengths=[2, 3], offsets=[0, 2, 5]),
            "Layer 'bag' received both `lengths` and `offsets`; they say the "
            "same thing. Pass one of them.",
        ),
        "lengths-sum": (
            lambda: bag()(flat, lengths=np.array([2, 2])),
            "Layer 'bag' received bag `lengths` adding up to 4 for 5 flat ids. "
            "The lengths must add up to the number of ids.",
        ),
        "lengths-sum-tensor": (
            lambda: bag()(
                ops.convert_to_tensor(flat),
                lengths=ops.convert_to_tensor(np.array([4, 2])),
            ),
            "received bag `lengths` adding up to 6 for 5 flat ids",
        ),
        "negative-lengths": (
            lambda: bag()(flat, lengths=np.array([3, -1, 3])),
            "Layer 'bag' received negative bag `lengths`: [3, -1, 3]. A length "
            "counts a bag's ids (0 for an empty bag).",
        ),
        "torch-style-offsets": (
            lambda: bag()(flat, offsets=np.array([0, 2, 2])),
            offsets_message.format("[0, 2, 2]"),
        ),
        "offsets-not-from-0": (
            lambda: bag()(flat, offsets=np.array([1, 2, 5])),
            offsets_message.format("[1, 2, 5]"),
        ),
        "offsets-decreasing": (
            lambda: bag()(flat, offsets=np.array([0, 3, 2, 5])),
            offsets_message.format("[0, 3, 2, 5]"),
        ),
        "dense-ids-with-lengths": (
            lambda: bag()(DENSE_IDS, lengths=np.full(8, 4)),
            "Layer 'bag' received `lengths` or `offsets` with ids of shape "
            "(8, 4): flat ids, the bags one after the other, must be 1-D.",
        ),
        "lengths-rank": (
            lambda: bag()(flat, lengths=np.array([[2, 3]])),
            "Layer 'bag' received `lengths` of shape (1, 2); it must be 1-D.",
        ),
    }
    if BACKEND == "tensorflow":
        import tensorflow as tf

        ragged = tf.ragged.constant([[1, 2], [], [3, 4, 5]])
        indices = [[0, 0], [0, 1], [2, 0]]
        sparse_ids = tf.SparseTensor(indices, [1, 2, 3], (3, 2))
        cases["ragged-ids-dense-weights"] = (
            lambda: bag()(ragged, weights=np.ones((3, 3), "float32")),
            "Layer 'bag' received ragged ids and weights of type",
        )
        cases["ragged-rank-3"] = (
            lambda: bag()(tf.ragged.constant([[[1], [2]], [[3]]])),
            "Layer 'bag' pools ragged ids of shape (batch, None)",
        )
        cases["sparse-ids-dense-weights"] = (
            lambda: bag()(sparse_ids, weights=np.ones((3, 2), "float32")),
            "Layer 'bag' received sparse ids and weights of type",
        )
        cases["sparse-weights-shape"] = (
            lambda: bag()(
                sparse_ids,
                weights=tf.SparseTensor([[0, 0], [2, 0]], [1.0, 2.0], (3, 2)),
            ),
            "received weights laid out differently from the ids",
        )
    if BACKEND == "jax":
        from jax.experimental import sparse

        indices = np.array([[0, 0], [0, 1], [2, 0]])
        bcoo = sparse.BCOO((np.array([1, 2, 3], "int32"), indices), shape=(3, 2))
        cases["bcoo-ids-dense-weights"] = (
            lambda: bag()(bcoo, weights=np.ones((3, 2), "float32")),
            "Layer 'bag' received sparse ids and weights of type",
        )
    return cases


ERRORS = _error_cases()


@pytest.mark.parametrize("case", list(ERRORS))
def test_refused_arguments(case):
    make, message = ERRORS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# --- Max and min: ties, and fit on JAX's row-batched BCOO. ---


@pytest.mark.parametrize("form", ["dense", "flat"])
def test_max_gradient_splits_evenly_between_tied_rows(form):
    """Rows 1 and 2 tie at the max of dimension 0 and rows 1 and 3 of
    dimension 1: each gets half of that dimension's gradient, as every
    backend's own max gradient does (documented in the guide)."""
    table = np.array([[0, 0], [1, 2], [1, 0], [0, 2]], "float32")
    layer = EmbeddingBag(4, 2, combiner="max", weights=table)
    ids = np.array([[1, 2, 3]], "int32")
    kwargs = {}
    if form == "flat":
        ids, kwargs = ids[0], {"lengths": np.array([3], "int32")}
    gradient, _ = backend_gradients(
        layer, ids, None, np.ones((1, 2), "float32"), **kwargs
    )
    np.testing.assert_allclose(
        gradient, [[0, 0], [0.5, 0.5], [0.5, 0], [0, 0.5]], atol=1e-7
    )


@pytest.mark.skipif(BACKEND != "jax", reason="BCOO is JAX's")
def test_fit_on_bcoo_batches_sliced_by_keras():
    """Keras's data adapter slices a BCOO into row-batched BCOOs
    (`n_batch=1`): their bags pool as the whole BCOO's do."""
    from jax.experimental import sparse

    ids = np.array([[1, 2, 0, 0], [0, 0, 0, 0], [3, 3, 5, 7]], "int32")
    layer = EmbeddingBag(V, D, combiner="sum", weights=random_table())
    inputs = keras.Input((4,), sparse=True, dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    expected = dense_reference(random_table(), ids, combiner="sum", padding=0)
    assert_pooled(
        model.predict(sparse.BCOO.fromdense(ids), batch_size=2, verbose=0), expected
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(sparse.BCOO.fromdense(ids), np.ones((3, D)), batch_size=2, verbose=0)
    moved = np.abs(to_numpy(layer.embeddings) - random_table()).sum(1) > 0
    np.testing.assert_array_equal(np.flatnonzero(moved), [1, 2, 3, 5, 7])


@pytest.mark.parametrize("combiner", COMBINERS)
def test_flat_bags_of_skewed_lengths(combiner):
    """Eager flat bags are pooled as dense bags when padding them at most
    doubles the positions, else by segments: both give the reference."""
    layer = make_layer(combiner, "mask_zero")
    table = reference_table(layer)
    rng = np.random.default_rng(3)
    for lengths in ([2, 3, 1, 2], [1, 0, 0, 12, 1]):  # dense, then segments
        bags = [list(rng.integers(0, V, size=n)) for n in lengths]
        weights = [list(rng.uniform(0.5, 2.0, size=n)) for n in lengths]
        flat = np.concatenate(bags).astype("int32")
        flat_weights = np.concatenate(weights).astype("float32")
        out = layer(flat, flat_weights, lengths=np.array(lengths, "int32"))
        assert_pooled(out, reference(table, bags, weights, combiner, padding=0))


def test_model_of_flat_bags_trains():
    """Keras infers a model's outputs before its first step by calling it
    on placeholder values (PyTorch: tensors of 1s, 83s or 89s): they are
    not checked as ids or layouts, here nor in an Embedding beside."""
    from keras_ext_embedding import Embedding

    ids = keras.Input((), dtype="int32")
    offsets = keras.Input((), dtype="int32")
    small = keras.Input((2,), dtype="int32")
    bag = EmbeddingBag(V, D, weights=random_table())
    pooled = bag(ids, offsets=offsets)
    rows = keras.layers.Flatten()(Embedding(50, 2)(small))
    model = keras.Model(
        [ids, offsets, small], keras.layers.Concatenate()([pooled, rows])
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    data = [np.array([1, 2, 3], "int32"), np.array([0, 2, 3], "int32")]
    data.append(np.array([[1, 2], [3, 4]], "int32"))
    model.train_on_batch(data, np.zeros((2, D + 4), "float32"))
    moved = np.abs(to_numpy(bag.embeddings) - random_table()).sum(1) > 0
    np.testing.assert_array_equal(np.flatnonzero(moved), [1, 2, 3])

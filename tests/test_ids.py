"""Ids: one behaviour on every backend, eagerly and inside Model.fit/predict."""

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
# Keras compiles Model.fit/predict on TensorFlow and JAX; on PyTorch it runs
# them eagerly (unless jit_compile=True), so the ids there can be read.
COMPILED_BY_DEFAULT = BACKEND in ("tensorflow", "jax")


def assert_invalid_id_error(error, name, value, position, input_dim):
    message = str(error)
    assert isinstance(error, InvalidIdError)
    assert isinstance(error, ValueError)
    assert (
        f"Layer '{name}' received an invalid id {value} at position {position}"
    ) in message, message
    assert (
        f"Ids must be whole numbers in [0, {input_dim - 1}] (input_dim={input_dim})"
    ) in message, message


# --- Integer ids -------------------------------------------------------------

INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_integer_ids_of_any_width(dtype, as_tensor):
    layer = Embedding(100, 3)
    ids = np.array([[0, 7], [99, 42]], dtype=dtype)
    arg = ops.convert_to_tensor(ids, dtype=dtype) if as_tensor else ids
    out = layer(arg)
    assert tuple(out.shape) == (2, 2, 3)
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids.astype(int)])


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16"])
def test_narrow_dtypes_against_a_larger_vocabulary(dtype):
    # Every value of the dtype is a valid row: the bounds checks must not
    # overflow the narrow dtype (input_dim - 1 = 299 does not fit in int8).
    layer = Embedding(300, 2)
    info = np.iinfo(dtype)
    ids = np.array([max(info.min, 0), min(info.max, 299)], dtype=dtype)
    out = layer(ops.convert_to_tensor(ids, dtype=dtype))
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids.astype(int)])


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_wide_numpy_ids_give_exact_rows(dtype):
    layer = Embedding(10, 3)
    ids = np.array([[9, 0], [3, 3]], dtype=dtype)
    np.testing.assert_array_equal(
        to_numpy(layer(ids)), table_of(layer)[[[9, 0], [3, 3]]]
    )


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
@pytest.mark.parametrize("value", [2**32 + 3, 2**32, 2**40 + 9])
def test_wide_numpy_ids_are_checked_on_the_host(dtype, value):
    # JAX without x64 narrows int64 to int32 and PyTorch has no uint64: a
    # narrowing conversion would wrap 2**32 + 3 to 3, a valid row.
    layer = Embedding(10, 3, name="wide")
    with pytest.raises(InvalidIdError) as info:
        layer(np.array([1, value], dtype=dtype))
    assert_invalid_id_error(info.value, "wide", value, (1,), 10)


def test_huge_uint64_id_is_reported_exactly():
    layer = Embedding(10, 3, name="wide")
    with pytest.raises(InvalidIdError) as info:
        layer(np.array([[2**64 - 1]], dtype="uint64"))
    assert_invalid_id_error(info.value, "wide", 2**64 - 1, (0, 0), 10)


def test_wide_numpy_ids_with_zeros_mode_never_wrap():
    layer = Embedding(10, 3, invalid_ids="zeros")
    ids = np.array([2**32 + 3, 3, -(2**32) + 3], dtype="int64")
    out = to_numpy(layer(ids))
    np.testing.assert_array_equal(out[1], table_of(layer)[3])
    np.testing.assert_array_equal(out[[0, 2]], np.zeros((2, 3)))


# --- Float ids -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_whole_float_ids_are_accepted(dtype):
    layer = Embedding(200, 3)
    values = np.array([[0.0, 3.0], [199.0, 42.0]])
    ids = ops.convert_to_tensor(values, dtype=dtype)
    np.testing.assert_array_equal(
        to_numpy(layer(ids)), table_of(layer)[values.astype(int)]
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_whole_float_numpy_ids_are_accepted(dtype):
    layer = Embedding(200, 3)
    values = np.array([[0.0, 3.0], [199.0, 42.0]], dtype=dtype)
    np.testing.assert_array_equal(
        to_numpy(layer(values)), table_of(layer)[values.astype(int)]
    )


@pytest.mark.parametrize(
    ("dtype", "largest_ok"),
    [("float16", 2049), ("bfloat16", 257), ("float32", 2**24 + 1)],
)
def test_float_dtype_must_hold_every_id(dtype, largest_ok):
    ids = ops.convert_to_tensor(np.array([1.0, 2.0]), dtype=dtype)
    # input_dim = largest_ok: ids up to largest_ok - 1 are exact in dtype.
    accepted = Embedding(largest_ok, 1, embeddings_initializer="ones")
    np.testing.assert_array_equal(to_numpy(accepted(ids)), np.ones((2, 1)))
    with pytest.raises(ValueError) as info:
        Embedding(largest_ok + 1, 1, embeddings_initializer="zeros", name="big")(ids)
    message = str(info.value)
    assert "Layer 'big' received ids of dtype " + dtype in message
    assert f"input_dim={largest_ok + 1}" in message
    assert "Pass integer ids" in message


def test_float_capacity_is_checked_for_numpy_ids_too():
    with pytest.raises(ValueError, match="ids of dtype float16"):
        Embedding(2050, 2)(np.array([1.0], dtype="float16"))
    Embedding(2049, 2)(np.array([1.0], dtype="float16"))


def test_float_capacity_is_checked_in_a_model():
    inputs = keras.Input((2,), dtype="float16")
    model = keras.Model(inputs, Embedding(5000, 2)(inputs))
    with pytest.raises(ValueError, match="ids of dtype float16"):
        model.predict(np.ones((1, 2), dtype="float16"), verbose=0)


# --- Ids that are not numbers ---------------------------------------------------


@pytest.mark.parametrize(
    "ids", [np.array([True, False]), np.array(["a", "b"]), np.array([1 + 0j])]
)
def test_non_numeric_numpy_ids_are_refused(ids):
    with pytest.raises(TypeError, match="expects integer ids"):
        Embedding(10, 2)(ids)


def test_bool_ids_are_refused():
    with pytest.raises(TypeError, match="expects integer ids") as info:
        Embedding(10, 2, name="flags")(ops.convert_to_tensor(np.array([True, False])))
    assert "Layer 'flags'" in str(info.value)
    assert "dtype bool" in str(info.value)
    with pytest.raises(TypeError, match="expects integer ids"):
        Embedding(10, 2)([True, False])
    inputs = keras.Input((2,), dtype="bool")
    model = keras.Model(inputs, Embedding(10, 2)(inputs))
    with pytest.raises(TypeError, match="expects integer ids"):
        model.predict(np.ones((1, 2), dtype="bool"), verbose=0)


# --- Eager invalid ids ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "value", "position"),
    [
        (np.array([[1, 2], [3, 10]], dtype="int32"), "10", (1, 1)),
        (np.array([[1, -1], [3, 4]], dtype="int32"), "-1", (0, 1)),
        (np.array([[1, 2], [-3, 11]], dtype="int32"), "-3", (1, 0)),
        (np.array([5, 2**31 - 1], dtype="int32"), str(2**31 - 1), (1,)),
        (np.array([5, 255], dtype="uint8"), "255", (1,)),
        (np.array([1.7, 2.0], dtype="float32"), "1.7", (0,)),
        (np.array([2.0, -0.5], dtype="float32"), "-0.5", (1,)),
        (np.array([2.0, 10.0], dtype="float32"), "10.0", (1,)),
        (np.array([[0.0], [np.nan]], dtype="float32"), "nan", (1, 0)),
        (np.array([1.0, np.inf], dtype="float32"), "inf", (1,)),
        (np.array([1.0, -np.inf], dtype="float32"), "-inf", (1,)),
        (np.array(10, dtype="int32"), "10", ()),
        (np.arange(24, dtype="int32").reshape(2, 3, 4) % 11 + 1, "10", (0, 2, 1)),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_eager_invalid_ids_raise(ids, value, position, as_tensor):
    layer = Embedding(10, 3, name="tokens")
    arg = ops.convert_to_tensor(ids) if as_tensor else ids
    with pytest.raises(InvalidIdError) as info:
        layer(arg)
    assert_invalid_id_error(info.value, "tokens", value, position, 10)


def test_python_list_with_an_invalid_id_raises():
    layer = Embedding(10, 3, name="tokens")
    with pytest.raises(InvalidIdError) as info:
        layer([[1, 2], [3, -4]])
    assert_invalid_id_error(info.value, "tokens", "-4", (1, 1), 10)


def test_the_layer_keeps_working_after_an_invalid_id():
    layer = Embedding(10, 3)
    with pytest.raises(InvalidIdError):
        layer(ops.convert_to_tensor(np.array([1, 10])))
    out = layer(ops.convert_to_tensor(np.array([1, 9])))
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[1, 9]])


def test_invalid_id_error_from_a_model_call():
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), Embedding(10, 3, name="tokens")]
    )
    with pytest.raises(InvalidIdError) as info:
        model(ops.convert_to_tensor(np.array([[1, 2, 12]], dtype="int32")))
    assert_invalid_id_error(info.value, "tokens", "12", (0, 2), 10)


# --- Model.predict and Model.fit --------------------------------------------------

BAD_IDS = np.array([[1, 10, -1, 3], [2**20, 9, 3, -7]], dtype="int32")
BAD_MASK = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
TARGETS = np.ones((2, 1), dtype="float32")


def make_model(**layer_kwargs):
    layer = Embedding(10, 3, name="tokens", **layer_kwargs)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    return model, layer


def fit_model(**layer_kwargs):
    model, layer = make_model(**layer_kwargs)
    model.add(keras.layers.GlobalAveragePooling1D())
    model.add(keras.layers.Dense(1))
    return model, layer


def expected_with_zeros(layer, ids=BAD_IDS, bad=BAD_MASK):
    """NumPy reference: the table's rows, zero rows at invalid positions."""
    expected = table_of(layer)[np.where(bad, 0, ids)]
    expected[bad] = 0.0
    return expected


def whole_or_zero(float_ids, bad):
    """Float ids as ints, with 0 at the invalid positions."""
    return np.where(bad, 0, np.nan_to_num(float_ids, posinf=0, neginf=0)).astype(int)


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="predict is eager on torch")
@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_compiled_predict_gives_zeros_at_invalid_positions(jit_compile):
    model, layer = make_model()
    model.compile(jit_compile=jit_compile)
    out = model.predict(BAD_IDS, verbose=0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, expected_with_zeros(layer))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_predict_with_invalid_ids_of_any_integer_dtype(dtype):
    layer = Embedding(10, 3, name="tokens")
    model = keras.Sequential([keras.Input((3,), dtype=dtype), layer])
    signed = np.iinfo(dtype).min < 0
    ids = np.array([[1, 12, -1 if signed else 9]], dtype=dtype)
    if COMPILED_BY_DEFAULT:
        out = model.predict(ids, verbose=0)
        expected = table_of(layer)[[[1, 0, 0 if signed else 9]]]
        expected[0, 1] = 0.0
        if signed:
            expected[0, 2] = 0.0
        np.testing.assert_array_equal(out, expected)
    else:
        with pytest.raises(InvalidIdError) as info:
            model.predict(ids, verbose=0)
        assert_invalid_id_error(info.value, "tokens", "12", (0, 1), 10)


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="predict is eager on torch")
def test_compiled_predict_without_compile_gives_zeros():
    model, layer = make_model()
    out = model.predict(BAD_IDS, batch_size=1, verbose=0)
    np.testing.assert_array_equal(out, expected_with_zeros(layer))
    # Not silent: the count waits in the layer (see the tests of reports).
    assert layer.traced_invalid_ids == BAD_MASK.sum()


@pytest.mark.skipif(
    BACKEND == "jax",
    reason="JAX without x64 narrows int64 model inputs to int32 before any layer runs",
)
def test_predict_on_int64_ids_beyond_int32():
    # 2**32 + 3 must not wrap to row 3 inside the compiled (TF) or eager
    # (torch) predict: the model input is int64 end to end.
    layer = Embedding(10, 3, name="tokens")
    model = keras.Sequential([keras.Input((2,), dtype="int64"), layer])
    ids = np.array([[2**32 + 3, 3]], dtype="int64")
    if COMPILED_BY_DEFAULT:
        out = model.predict(ids, verbose=0)
        np.testing.assert_array_equal(out[0, 0], np.zeros(3))
        np.testing.assert_array_equal(out[0, 1], table_of(layer)[3])
    else:
        with pytest.raises(InvalidIdError) as info:
            model.predict(ids, verbose=0)
        assert_invalid_id_error(info.value, "tokens", str(2**32 + 3), (0, 0), 10)


@pytest.mark.skipif(COMPILED_BY_DEFAULT, reason="predict is compiled on TF and JAX")
def test_eager_predict_raises_on_torch():
    model, _ = make_model()
    with pytest.raises(InvalidIdError) as info:
        model.predict(BAD_IDS, verbose=0)
    assert_invalid_id_error(info.value, "tokens", "10", (0, 1), 10)


@pytest.mark.parametrize("method", ["predict", "fit", "evaluate"])
def test_run_eagerly_raises_everywhere(method):
    model, _ = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse", run_eagerly=True)
    with pytest.raises(InvalidIdError) as info:
        if method == "predict":
            model.predict(BAD_IDS, verbose=0)
        elif method == "fit":
            model.fit(BAD_IDS, TARGETS, epochs=1, shuffle=False, verbose=0)
        else:
            model.evaluate(BAD_IDS, TARGETS, verbose=0)
    assert_invalid_id_error(info.value, "tokens", "10", (0, 1), 10)


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="fit is eager on torch")
def test_compiled_fit_with_invalid_ids_stays_finite():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = table_of(layer)
    # The epoch trains on zeros at the invalid ids, then fit raises with
    # their count (one epoch's: it stops after the first).
    with pytest.raises(InvalidIdError, match=f"looked up {BAD_MASK.sum()} invalid"):
        model.fit(BAD_IDS, TARGETS, epochs=3, verbose=0)
    for variable in model.weights:
        assert np.isfinite(ops.convert_to_numpy(variable)).all(), variable.path
    # Invalid ids read row 0 behind the zeros, but none of their gradient may
    # reach it: the rows no valid id looks up (0 among them) do not move.
    after = table_of(layer)
    valid_ids = set(BAD_IDS[~BAD_MASK].tolist())
    assert 0 not in valid_ids
    untouched = sorted(set(range(10)) - valid_ids)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    touched = sorted(valid_ids)
    assert not np.array_equal(after[touched], before[touched])


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="fit is eager on torch")
def test_compiled_fit_on_only_invalid_ids_leaves_the_table():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = table_of(layer)
    ids = np.array([[-1, 10, 11, 2**30]], dtype="int32")
    with pytest.raises(InvalidIdError, match="looked up 4 invalid ids"):
        model.fit(ids, TARGETS[:1], epochs=2, verbose=0)
    np.testing.assert_array_equal(table_of(layer), before)


@pytest.mark.skipif(COMPILED_BY_DEFAULT, reason="fit is compiled on TF and JAX")
def test_eager_fit_raises_on_torch():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = table_of(layer)
    with pytest.raises(InvalidIdError) as info:
        model.fit(BAD_IDS, TARGETS, epochs=1, shuffle=False, verbose=0)
    assert_invalid_id_error(info.value, "tokens", "10", (0, 1), 10)
    np.testing.assert_array_equal(table_of(layer), before)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_gives_zeros():
    import tensorflow as tf

    layer = Embedding(10, 3)
    layer.build()
    out = tf.function(layer)(tf.constant(BAD_IDS))
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))
    out = tf.function(layer, jit_compile=True)(tf.constant(BAD_IDS))
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_float_ids_give_zeros():
    import tensorflow as tf

    layer = Embedding(10, 3)
    layer.build()
    ids = np.array([1.0, 1.5, np.nan, np.inf, -2.0, 9.0], dtype="float32")
    bad = np.array([0, 1, 1, 1, 1, 0], dtype=bool)
    out = tf.function(layer)(tf.constant(ids))
    expected = expected_with_zeros(layer, whole_or_zero(ids, bad), bad)
    np.testing.assert_array_equal(to_numpy(out), expected)


def expected_gradient():
    """d sum(outputs) / d table: how often each row is read by a valid id."""
    counts = np.bincount(BAD_IDS[~BAD_MASK], minlength=10)
    return np.repeat(counts[:, None], 3, axis=1).astype("float64")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_gradient_is_finite_and_skips_invalid_ids():
    import tensorflow as tf

    layer = Embedding(10, 3)
    layer.build()
    table = layer.trainable_variables[0]

    @tf.function
    def gradient(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids))
        return tf.convert_to_tensor(tape.gradient(loss, table.value))

    np.testing.assert_array_equal(
        gradient(tf.constant(BAD_IDS)).numpy(), expected_gradient()
    )


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jax_jit_gives_zeros():
    import jax

    layer = Embedding(10, 3)
    layer.build()

    @jax.jit
    def lookup(variables, state, ids):
        return layer.stateless_call(variables, state, ids)[0]

    state = [v.value for v in layer.non_trainable_variables]
    out = lookup([v.value for v in layer.trainable_variables], state, BAD_IDS)
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jax_jit_gradient_is_finite_and_skips_invalid_ids():
    import jax

    layer = Embedding(10, 3)
    layer.build()

    state = [v.value for v in layer.non_trainable_variables]

    def loss(table, ids):
        return layer.stateless_call([table], state, ids)[0].sum()

    grad = jax.jit(jax.grad(loss))(layer.trainable_variables[0].value, BAD_IDS)
    np.testing.assert_array_equal(np.asarray(grad), expected_gradient())


# --- Traced invalid ids are reported -------------------------------------------------

REPORT = f"Layer 'tokens' looked up {BAD_MASK.sum()} invalid ids in traced calls"
GOOD_IDS = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype="int32")


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="evaluate is eager on torch")
def test_compiled_evaluate_raises_at_its_end_with_the_count():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(InvalidIdError) as info:
        model.evaluate(BAD_IDS, TARGETS, batch_size=1, verbose=0)
    message = str(info.value)
    assert message.startswith(REPORT + " since the last report"), message
    assert "[0, 9] (input_dim=10)" in message
    assert "invalid_ids='zeros'" in message
    # Reported once: the count starts again, and valid ids evaluate as usual.
    assert layer.traced_invalid_ids == 0
    assert np.isfinite(model.evaluate(GOOD_IDS, TARGETS, verbose=0))


@pytest.mark.skipif(COMPILED_BY_DEFAULT, reason="evaluate is compiled on TF and JAX")
def test_eager_evaluate_raises_on_torch():
    model, _ = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(InvalidIdError) as info:
        model.evaluate(BAD_IDS, TARGETS, verbose=0)
    assert_invalid_id_error(info.value, "tokens", "10", (0, 1), 10)


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="predict is eager on torch")
def test_a_count_left_by_predict_is_warned_at_the_next_evaluate():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.predict(BAD_IDS, verbose=0)
    assert layer.traced_invalid_ids == BAD_MASK.sum()
    with pytest.warns(UserWarning, match=REPORT + " before this fit or evaluate"):
        loss = model.evaluate(GOOD_IDS, TARGETS, verbose=0)
    assert np.isfinite(loss)
    assert layer.traced_invalid_ids == 0


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="fit is eager on torch")
def test_fit_on_valid_ids_reports_nothing_and_keeps_keras_logs():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
    history = model.fit(GOOD_IDS, TARGETS, epochs=2, verbose=0)
    # The report adds no key to the logs, nor a value to evaluate's list.
    assert sorted(history.history) == ["loss", "mae"]
    assert len(model.evaluate(GOOD_IDS, TARGETS, verbose=0)) == 2
    assert layer.traced_invalid_ids == 0


@pytest.mark.skipif(not COMPILED_BY_DEFAULT, reason="fit is eager on torch")
def test_fit_after_a_report_trains_on():
    model, layer = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(InvalidIdError, match=REPORT):
        model.fit(BAD_IDS, TARGETS, epochs=1, verbose=0)
    before = table_of(layer)
    history = model.fit(GOOD_IDS, TARGETS, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.array_equal(table_of(layer), before)


@pytest.mark.skipif(COMPILED_BY_DEFAULT, reason="torch compiles only on request")
def test_torch_compiled_fit_raises_at_the_id():
    # torch.compile breaks the graph at the host read of the ids: the check
    # runs eagerly and raises at the first invalid id, as without it.
    model, _ = fit_model()
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    with pytest.raises(InvalidIdError) as info:
        model.fit(BAD_IDS, TARGETS, epochs=1, shuffle=False, verbose=0)
    assert_invalid_id_error(info.value, "tokens", "10", (0, 1), 10)


def test_zeros_mode_counts_nothing():
    model, layer = fit_model(invalid_ids="zeros")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    history = model.fit(BAD_IDS, TARGETS, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.predict(BAD_IDS, verbose=0)
    assert layer.traced_invalid_ids == 0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow graph's ops")
@pytest.mark.parametrize("mode", ["raise", "zeros"])
def test_only_raise_adds_the_count_to_a_traced_lookup(mode):
    import tensorflow as tf

    layer = Embedding(10, 3, invalid_ids=mode)
    layer.build()
    lookup = tf.function(lambda ids: layer(ids, training=False))
    graph = lookup.get_concrete_function(tf.TensorSpec((None, 4), tf.int32)).graph
    writes = [op.type for op in graph.get_operations() if "Assign" in op.type]
    assert writes == (["AssignVariableOp"] if mode == "raise" else [])


def test_the_counter_is_state_not_a_weight():
    model, layer = make_model()
    assert [v.name for v in layer.weights] == ["embeddings"]
    # PyTorch reads every id on the host: nothing to count, no counter.
    counter = [] if BACKEND == "torch" else ["traced_invalid_ids"]
    assert [v.name for v in layer.variables] == ["embeddings", *counter]
    assert [v.name for v in model.non_trainable_variables] == counter
    assert layer.traced_invalid_ids == 0
    assert Embedding(10, 3).traced_invalid_ids == 0  # unbuilt
    if BACKEND == "torch":
        keras_model = keras.Sequential(
            [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3)]
        )
        assert [tuple(v.shape) for v in model.state_dict().values()] == [
            tuple(v.shape) for v in keras_model.state_dict().values()
        ]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
def test_tf_function_step_of_ones_own_counts():
    import tensorflow as tf

    model, layer = make_model()
    step = tf.function(lambda ids: model(ids, training=True))
    np.testing.assert_array_equal(
        to_numpy(step(tf.constant(BAD_IDS))), expected_with_zeros(layer)
    )
    tf.function(lambda ids: model(ids, training=False), jit_compile=True)(
        tf.constant(BAD_IDS)
    )
    assert layer.traced_invalid_ids == 2 * BAD_MASK.sum()
    # A call without `training` (an export's serving function) adds no state.
    tf.function(model)(tf.constant(BAD_IDS))
    assert layer.traced_invalid_ids == 2 * BAD_MASK.sum()
    with pytest.raises(InvalidIdError, match="looked up 8 invalid ids"):
        model.get_metrics_result()
    assert layer.traced_invalid_ids == 0


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_jax_stateless_step_of_ones_own_counts():
    import jax

    model, layer = make_model()
    trainable = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]
    step = jax.jit(lambda t, s, ids: model.stateless_call(t, s, ids, training=True))
    out, state = step(trainable, state, BAD_IDS)
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))
    # The count comes back with the state, as any non-trainable variable.
    assert [int(value) for value in state] == [BAD_MASK.sum()]
    for variable, value in zip(model.non_trainable_variables, state, strict=True):
        variable.assign(value)
    assert layer.traced_invalid_ids == BAD_MASK.sum()
    with pytest.raises(InvalidIdError, match=REPORT):
        model.get_metrics_result()
    # jax.jit over a plain model call cannot carry the count: zeros, no
    # leaked tracer in the counter.
    out = jax.jit(lambda ids: model(ids, training=False))(BAD_IDS)
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))
    assert layer.traced_invalid_ids == 0


# --- invalid_ids="zeros" -----------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_zeros_mode_eagerly(as_tensor):
    layer = Embedding(10, 3, invalid_ids="zeros")
    arg = ops.convert_to_tensor(BAD_IDS) if as_tensor else BAD_IDS
    out = to_numpy(layer(arg))
    np.testing.assert_array_equal(out, expected_with_zeros(layer))


def test_zeros_mode_in_predict_and_a_model_call():
    model, layer = make_model(invalid_ids="zeros")
    expected = expected_with_zeros(layer)
    np.testing.assert_array_equal(model.predict(BAD_IDS, verbose=0), expected)
    model.compile(run_eagerly=True)
    np.testing.assert_array_equal(model.predict(BAD_IDS, verbose=0), expected)
    out = model(ops.convert_to_tensor(BAD_IDS))
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_zeros_mode_float_ids():
    layer = Embedding(10, 3, invalid_ids="zeros")
    ids = np.array([1.0, 1.5, np.nan, -2.0, 9.0, 10.0, np.inf], dtype="float32")
    bad = np.array([0, 1, 1, 1, 0, 1, 1], dtype=bool)
    out = to_numpy(layer(ops.convert_to_tensor(ids)))
    expected = expected_with_zeros(layer, whole_or_zero(ids, bad), bad)
    np.testing.assert_array_equal(out, expected)


def test_zeros_mode_fit_never_raises_and_stays_finite():
    model, layer = fit_model(invalid_ids="zeros")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = table_of(layer)
    history = model.fit(BAD_IDS, TARGETS, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = table_of(layer)
    assert np.isfinite(after).all()
    np.testing.assert_array_equal(after[0], before[0])  # only invalid ids read 0


def _refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"ops.{name} was dispatched")

    return refused


DEVICE_CHECK_OPS = ("clip", "minimum", "maximum", "equal", "where", "logical_and")


@pytest.mark.skipif(
    BACKEND == "torch", reason="PyTorch's traces read as eager tensors: no read"
)
def test_zeros_mode_checks_host_ids_on_the_host(monkeypatch):
    # Eager ids in host memory (a CPU's) are read without a copy: valid ones
    # need none of the device's clip, compare and select, which an eager
    # call dispatches one by one.
    layer = Embedding(10, 3, invalid_ids="zeros")
    layer.build()
    ids = ops.convert_to_tensor(np.array([[0, 9], [4, 4]], dtype="int32"))
    for name in DEVICE_CHECK_OPS:
        monkeypatch.setattr(ops, name, _refuse(name))
    expected = table_of(layer)[[[0, 9], [4, 4]]]
    np.testing.assert_array_equal(to_numpy(layer(ids)), expected)
    monkeypatch.undo()
    # An invalid id among them is left to the device, which zeroes its row.
    out = to_numpy(layer(ops.convert_to_tensor(BAD_IDS)))
    np.testing.assert_array_equal(out, expected_with_zeros(layer))


def test_zeros_mode_never_copies_ids_from_an_accelerator(monkeypatch):
    # Where the backend's devices are not the host's CPU, "zeros" reads no
    # ids (a copy and a wait for the device): the device checks them. On
    # PyTorch never (a trace reads as an eager tensor), on this CPU too.
    from keras_ext_embedding import _ids

    layer = Embedding(10, 3, invalid_ids="zeros")
    layer.build()
    if BACKEND != "torch":
        monkeypatch.setattr(_ids, "_devices_are_host", lambda: False)

    def unread(*args):
        raise AssertionError("the ids were read on the host")

    # Ids read on the host are checked there: neither check may run.
    monkeypatch.setattr(_ids, "_all_valid_on_host", unread)
    monkeypatch.setattr(_ids, "raise_first_invalid", unread)
    out = layer(ops.convert_to_tensor(BAD_IDS))
    monkeypatch.undo()
    np.testing.assert_array_equal(to_numpy(out), expected_with_zeros(layer))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8"])
def test_the_host_check_finds_negative_and_large_ids(dtype):
    from keras_ext_embedding import _ids

    info = np.iinfo(dtype)
    for bad in {info.min, -1, 100, info.max} - set(range(0, 100)):
        if not info.min <= bad <= info.max:
            continue
        ids = np.array([[3, bad], [0, 99]], dtype=dtype)
        # NumPy ids: JAX without x64 would narrow int64 ones to int32.
        assert not _ids.eager_check(ids, 100, "x", strict=False)
        with pytest.raises(InvalidIdError, match=f"invalid id {bad} at position"):
            _ids.eager_check(ids, 100, "x")
    valid = np.array([[3, 0], [0, 99]], dtype=dtype)
    assert _ids.eager_check(valid, 100, "x")
    # Not strict ("zeros"), valid ids are read only where that is safe: on
    # this CPU, except on PyTorch (its traces read as eager tensors).
    read = BACKEND != "torch"
    assert _ids.eager_check(valid, 100, "x", strict=False) is read
    assert (
        _ids.eager_check(ops.convert_to_tensor(valid), 100, "x", strict=False) is read
    )


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is PyTorch's")
@pytest.mark.parametrize(
    "mode, quantize, lora, breaks",
    [("raise", None, False, 1), ("zeros", "int4", True, 0)],
)
def test_torch_compile_breaks_the_graph_only_to_read_the_ids(
    mode, quantize, lora, breaks
):
    # "raise" breaks the graph once, where Keras's layer does not: to check
    # the ids on the host (and raise at an invalid one). Nothing else of the
    # layer (its properties, its dtype policy, int4's unpacking, LoRA) leaves
    # the graph, and "zeros" reads no id on PyTorch: no break at all.
    import torch

    layer = Embedding(10, 4, invalid_ids=mode)
    layer.build()
    if quantize:
        layer.quantize(quantize)
    if lora:
        layer.enable_lora(2)
    ids = ops.convert_to_tensor(np.array([[1, 2], [3, 9]], dtype="int32"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: layer(ids))(ids)
    reasons = explained.break_reasons
    assert explained.graph_break_count == breaks, [r.reason for r in reasons]
    for reason in reasons:
        frames = [(frame.filename, frame.name) for frame in reason.user_stack]
        assert frames[-1][0].endswith("_ids.py"), frames
        assert any(name == "eager_check" for _, name in frames), frames

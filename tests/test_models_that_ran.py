"""Changing the layer of a model that already ran: quantize, enable or merge
LoRA after `predict`, `evaluate` or `fit` traced the model's functions.

The rule on every backend: the next `predict` and `evaluate` give the rows the
layer holds now, exactly as a direct layer call does. Training is different:
Keras's compiled train function and optimizer hold the trainable variables
they were built with, and no layer can reach them, so training after a change
needs `model.compile(...)` again. What each backend does without it is pinned
here, so a change in Keras shows up as a failing test.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops
from quantization_reference import CONFIG_IDS, CONFIGS, config_for, dequantized_table

from keras_ext_embedding import Embedding

BACKEND = keras.config.backend()
VOCAB, DIM, LENGTH = 40, 6, 5


def raw(x):
    """A tensor or variable in its own dtype, for bitwise comparisons."""
    return np.array(ops.convert_to_numpy(x))


def table_values(layer):
    """The layer's own `embeddings` variable (float or quantized), as numpy."""
    return raw(next(w for w in layer.weights if w.name == "embeddings"))


def lookup_model(layer):
    """ids -> the layer's rows: `predict` returns exactly what the layer holds."""
    inputs = keras.Input((LENGTH,), dtype="int32")
    return keras.Model(inputs, layer(inputs))


def pooled_model(layer):
    """ids -> rows -> mean over positions -> Dense(1): a model that trains."""
    inputs = keras.Input((LENGTH,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(pooled))


def task(rng, n=32):
    ids = rng.integers(0, VOCAB, size=(n, LENGTH)).astype("int32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return ids, y


def randomize(variable, rng, scale=0.5):
    variable.assign(rng.normal(scale=scale, size=variable.shape).astype("float32"))


def compiled(model, jit_compile=False):
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit_compile)
    return model


# Jit compilation is TensorFlow's choice to make here: JAX's predict is always
# jitted, and Keras's torch.compile path is out of this suite's scope.
JIT = [False, True] if BACKEND == "tensorflow" else [False]
JIT_IDS = ["tf.function", "xla"] if BACKEND == "tensorflow" else ["default"]


# predict and evaluate after quantize.


@pytest.mark.parametrize("jit_compile", JIT, ids=JIT_IDS)
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_predict_after_quantize_gives_the_quantized_rows(
    mode, block_size, lora, jit_compile, rng
):
    layer = Embedding(VOCAB, DIM, lora_rank=2 if lora else None)
    model = compiled(lookup_model(layer), jit_compile)
    randomize(layer._embeddings, rng)
    if lora:
        randomize(layer.lora_embeddings_b, rng)
    ids, _ = task(rng)
    float_rows = model.predict(ids, verbose=0)  # traces the predict function

    layer.quantize(mode, config=config_for(mode, block_size))

    predicted = model.predict(ids, verbose=0)
    # What an eager call computes, and bit for bit what a freshly traced
    # function computes except where XLA fuses the sum with the LoRA rows.
    retraced = compiled(model, jit_compile).predict(ids, verbose=0)
    np.testing.assert_allclose(predicted, retraced, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predicted, raw(layer(ids)), rtol=0, atol=1e-6)
    if not (lora and jit_compile):
        np.testing.assert_array_equal(predicted, raw(layer(ids)))
        np.testing.assert_array_equal(predicted, retraced)
    # The quantized table is really what the model reads now.
    assert np.abs(predicted - float_rows).max() > 1e-4
    if not lora:
        np.testing.assert_allclose(predicted, dequantized_table(layer)[ids], atol=1e-6)


@pytest.mark.parametrize("jit_compile", JIT, ids=JIT_IDS)
@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_evaluate_after_quantize_gives_the_quantized_loss(
    mode, block_size, jit_compile, rng
):
    layer = Embedding(VOCAB, DIM)
    model = compiled(pooled_model(layer), jit_compile)
    randomize(layer._embeddings, rng)
    ids, y = task(rng)
    float_loss = model.evaluate(ids, y, verbose=0)  # traces the test function

    layer.quantize(mode, config=config_for(mode, block_size))

    loss = model.evaluate(ids, y, verbose=0)
    expected = float(np.mean((raw(model(ids)) - y) ** 2))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert loss != float_loss


def traced_lookup(rng, **kwargs):
    """A lookup model on a random table whose predict function has run."""
    layer = Embedding(VOCAB, DIM, **kwargs)
    model = compiled(lookup_model(layer))
    randomize(layer._embeddings, rng)
    ids, _ = task(rng)
    model.predict(ids, verbose=0)
    return layer, model, ids


def test_predict_after_quantize_under_mixed_bfloat16(rng):
    layer, model, ids = traced_lookup(rng, dtype="mixed_bfloat16")
    layer.quantize("int4")
    predicted = model.predict(ids, verbose=0)
    assert keras.backend.standardize_dtype(predicted.dtype) == "bfloat16"
    np.testing.assert_array_equal(predicted, raw(layer(ids)))


def test_model_quantize_retraces_and_gives_the_quantized_rows(rng):
    layer, model, ids = traced_lookup(rng, name="tokens")
    model.quantize("int4", filters="tokens")
    assert model.predict_function is None  # Keras drops the traced functions
    np.testing.assert_array_equal(model.predict(ids, verbose=0), raw(layer(ids)))


# predict after enable_lora and merge_lora.


def test_predict_after_enable_lora_then_after_recompiled_training(rng):
    layer = Embedding(VOCAB, DIM)
    model = compiled(pooled_model(layer))
    ids, y = task(rng)
    model.fit(ids, y, epochs=1, verbose=0)
    model.predict(ids, verbose=0)

    layer.enable_lora(2)
    np.testing.assert_array_equal(model.predict(ids, verbose=0), raw(model(ids)))

    table = table_values(layer)
    compiled(model).fit(ids, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(table_values(layer), table)  # frozen
    assert np.abs(raw(layer.lora_embeddings_b)).max() > 0  # the adapters trained
    np.testing.assert_array_equal(model.predict(ids, verbose=0), raw(model(ids)))


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
def test_predict_after_merge_lora_on_a_quantized_table(mode, block_size, rng):
    layer = Embedding(VOCAB, DIM, lora_rank=2)
    layer.build()
    randomize(layer._embeddings, rng)
    layer.quantize(mode, config=config_for(mode, block_size))
    randomize(layer.lora_embeddings_a, rng)
    randomize(layer.lora_embeddings_b, rng)
    model = compiled(lookup_model(layer))
    ids, _ = task(rng)
    before = model.predict(ids, verbose=0)

    layer.merge_lora()

    predicted = model.predict(ids, verbose=0)
    np.testing.assert_array_equal(predicted, raw(layer(ids)))
    # Merging re-quantizes: within one quantization step of the LoRA rows.
    assert np.abs(predicted - before).max() < 0.5


# Training after a change: recompile. What each backend does without it.

CHANGES = ["enable_lora", "merge_lora", "quantize"]
# Keras's optimizers on JAX and PyTorch check the variables they are given
# against those they were built with; its TensorFlow train function is a graph
# traced with the old variables, which keeps running.
JAX_ERROR = "must be a list of tensors corresponding 1:1 to the trainable variables"
TORCH_ERROR = "Unknown variable"
# The error `fit` raises right after each change without a new compile, or
# None where it runs (Keras 3.15.1). docs/guides/lora.md shows this table.
WITHOUT_RECOMPILING = {
    "enable_lora": {"tensorflow": None, "jax": JAX_ERROR, "torch": TORCH_ERROR},
    "merge_lora": {"tensorflow": None, "jax": JAX_ERROR, "torch": TORCH_ERROR},
    "quantize": {"tensorflow": None, "jax": JAX_ERROR, "torch": None},
}


def changed_after_training(change, rng, model_quantize=False):
    """A model trained once, then `change` applied to its Embedding."""
    layer = Embedding(VOCAB, DIM, lora_rank=2 if change == "merge_lora" else None)
    model = compiled(pooled_model(layer))
    ids, y = task(rng)
    if change == "merge_lora":
        randomize(layer.lora_embeddings_b, rng)
    model.fit(ids, y, epochs=1, verbose=0)
    if change == "enable_lora":
        layer.enable_lora(2)
    elif change == "merge_lora":
        layer.merge_lora()
    elif model_quantize:
        model.quantize("int8", filters=layer.name)
    else:
        layer.quantize("int8")
    return layer, model, ids, y


@pytest.mark.parametrize("change", CHANGES)
def test_fit_after_a_change_without_recompiling(change, rng):
    layer, model, ids, y = changed_after_training(change, rng)
    table = table_values(layer)
    error = WITHOUT_RECOMPILING[change][BACKEND]
    if error is not None:
        with pytest.raises(ValueError, match=re.escape(error)):
            model.fit(ids, y, epochs=2, verbose=0)
        if BACKEND == "jax":
            # Keras's JAX fit detaches every variable's value from the model
            # for the length of an epoch and reattaches them at its end; an
            # error in between leaves the model without values.
            with pytest.raises(TypeError):
                table_values(layer)
        else:
            np.testing.assert_array_equal(table_values(layer), table)
    elif change == "enable_lora":
        # TensorFlow, silently: the old graph keeps training the table, and
        # the adapters never move.
        model.fit(ids, y, epochs=2, verbose=0)
        assert not np.array_equal(table_values(layer), table)
        assert not np.any(raw(layer.lora_embeddings_b))
    else:
        # TensorFlow's old graph trains variables the layer no longer holds
        # (the deleted adapters, the float table); PyTorch's optimizer takes
        # the smaller set of variables left by quantize. The table stays.
        model.fit(ids, y, epochs=2, verbose=0)
        np.testing.assert_array_equal(table_values(layer), table)


@pytest.mark.parametrize("change", CHANGES)
def test_fit_after_a_change_and_recompiling_trains_what_the_layer_holds(change, rng):
    layer, model, ids, y = changed_after_training(change, rng, model_quantize=True)
    head = raw(model.get_layer("head").kernel)
    table = table_values(layer)

    history = compiled(model).fit(ids, y, epochs=2, verbose=0)

    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.array_equal(raw(model.get_layer("head").kernel), head)
    if change == "merge_lora":  # the merged table is trainable again
        assert not np.array_equal(table_values(layer), table)
    else:  # frozen: LoRA's base table, a quantized table
        np.testing.assert_array_equal(table_values(layer), table)
    if change == "enable_lora":
        assert np.any(raw(layer.lora_embeddings_b))
    np.testing.assert_array_equal(model.predict(ids, verbose=0), raw(model(ids)))

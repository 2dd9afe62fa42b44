"""The layers the benchmarks compare, and the ways of calling them.

Ours (`keras_ext_embedding.Embedding`) and Keras's (`keras.layers.Embedding`)
are always built holding the same weights and checked to compute the same
outputs before anything is timed.
"""

import keras
import numpy as np
from keras import ops
from plan import BATCH_SHAPE, LORA_RANK, OUTPUT_DIM
from timing import BACKEND, SEED, ours_against_keras

import keras_ext_embedding


def nonzero_lora_b(rank=LORA_RANK):
    """A small non-zero LoRA `B`: `B` starts at zero, and a non-zero one
    makes the delta real work to add."""
    rng = np.random.default_rng(SEED)
    return rng.normal(size=(rank, OUTPUT_DIM)).astype("float32") * 0.01


def build_pair(input_dim, lora_rank=None, **ours_kwargs):
    """Ours and Keras's layer, built, holding the same weights."""
    ours = keras_ext_embedding.Embedding(
        input_dim, OUTPUT_DIM, lora_rank=lora_rank, **ours_kwargs
    )
    theirs = keras.layers.Embedding(input_dim, OUTPUT_DIM, lora_rank=lora_rank)
    ours.build()
    theirs.build()
    if lora_rank:
        ours.lora_embeddings_b.assign(nonzero_lora_b(lora_rank))
    # Copies through NumPy: on JAX, assigning the variable itself would share
    # one buffer between both layers, which a donating train step deletes.
    for ours_variable, keras_variable in zip(ours.weights, theirs.weights, strict=True):
        keras_variable.assign(ops.convert_to_numpy(ours_variable))
    return ours, theirs


def quantization_config(mode, block_size):
    if mode == "int8":
        return None
    return keras.quantizers.Int4QuantizationConfig(block_size=block_size)


def quantized_pair(input_dim, mode, block_size, lora_rank=None):
    """Ours and Keras's layer quantized alike from the same float table."""
    ours, theirs = build_pair(input_dim)
    for layer in (ours, theirs):
        layer.quantize(mode, config=quantization_config(mode, block_size))
        if lora_rank:
            layer.enable_lora(lora_rank)
    if lora_rank:
        b = nonzero_lora_b(lora_rank)
        for layer in (ours, theirs):
            layer.lora_embeddings_b.assign(b)
            layer.lora_embeddings_a.assign(ops.convert_to_numpy(ours.lora_embeddings_a))
    return ours, theirs


def check_same(ours, theirs, ids):
    """Guards the timings: both layers must compute the same rows."""
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours(ids)),
        ops.convert_to_numpy(theirs(ids)),
        rtol=1e-5,
        atol=1e-6,
    )


def variable_bytes(layer):
    """The bytes of every variable of `layer` (table, scales, LoRA factors)."""
    return sum(
        int(np.prod(v.shape))
        * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in layer.weights
    )


def compiled_forwards(layer, torch_compile=False):
    """`{mode: callable(ids)}` of the compiled forward passes of a layer (the
    call's other arguments, such as a bag layer's `lengths`, pass through).

    On PyTorch only with `torch_compile`: on CPU each first call compiles
    for seconds, and Keras itself does not compile on PyTorch by default.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return {
            "tf.function": tf.function(layer.__call__, jit_compile=False),
            "tf.function XLA": tf.function(layer.__call__, jit_compile=True),
        }
    if BACKEND == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, *args, **kwargs):
            return layer.stateless_call(trainable, non_trainable, *args, **kwargs)[0]

        def call(*args, **kwargs):
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            return forward(trainable, non_trainable, *args, **kwargs)

        return {"jax.jit": call}
    if torch_compile:
        import torch

        return {"torch.compile": torch.compile(layer.__call__)}
    return {}


def forwards(layer, torch_compile=False):
    """`{mode: callable(ids)}`: the eager call, then the compiled ones."""
    return {"eager": layer.__call__, **compiled_forwards(layer, torch_compile)}


def compare_forwards(ours, theirs, ids, reps, warmup, settle):
    """Times ours against Keras's on `ids`, eagerly and in each compiled mode
    of the backend; yields `(mode, result of ours_against_keras)`."""
    theirs_forwards = forwards(theirs)
    for mode, mine in forwards(ours).items():
        other = theirs_forwards[mode]
        result = ours_against_keras(
            lambda mine=mine: mine(ids),
            lambda other=other: other(ids),
            reps,
            warmup,
            settle=settle,
        )
        yield mode, result


# Keras's default execution of `train_on_batch` per backend: XLA on JAX,
# tf.function without XLA on a TensorFlow CPU, eager on PyTorch.
TRAIN_MODE = {
    "jax": "train_on_batch (jax.jit)",
    "tensorflow": "train_on_batch (tf.function)",
    "torch": "train_on_batch (eager)",
}[BACKEND]


def train_model(layer):
    """`Input -> layer -> GlobalAveragePooling1D`, compiled with SGD and MSE."""
    inputs = keras.Input(BATCH_SHAPE[1:], dtype="int32")
    outputs = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def compare_train_steps(ours, theirs, ids, reps, warmup, settle):
    """Times one `train_on_batch` of a model around ours against one around
    Keras's; returns the result of ours_against_keras."""
    rng = np.random.default_rng(SEED)
    targets = rng.normal(size=(BATCH_SHAPE[0], OUTPUT_DIM)).astype("float32")
    ids = ops.convert_to_numpy(ids)
    ours_model = train_model(ours)
    theirs_model = train_model(theirs)
    # train_on_batch returns the loss as Python floats: the step has finished.
    return ours_against_keras(
        lambda: ours_model.train_on_batch(ids, targets),
        lambda: theirs_model.train_on_batch(ids, targets),
        reps,
        warmup,
        settle=settle,
    )

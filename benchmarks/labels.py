"""Names the report and the plots show for backends, modes and configurations."""

from plan import (
    BAGS_MEMORY_CONFIGS,
    DECODING_FORMATS,
    MEMORY_CONFIGS,
    REVERSE_FORMATS,
    SHARDED_CONFIGS,
)

BACKEND_TITLES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}

# The compiled forward pass a plot shows per backend: Keras's default on
# each (tf.function without XLA on a TensorFlow CPU). PyTorch has none in the
# scaling section: Keras does not compile on PyTorch by default, and
# torch.compile takes seconds per layer and size.
PLOTTED_COMPILED_MODE = {"tensorflow": "tf.function", "jax": "jax.jit"}

# The backend's own gather, per mode, as the native-floor rows name it.
NATIVE_OPS = {
    "eager": {
        "tensorflow": "`tf.gather`",
        "jax": "`jnp.take`",
        "torch": "`torch.nn.functional.embedding`",
    },
    "tf.function": "`tf.gather` in `tf.function`",
    "tf.function XLA": "`tf.gather` in `tf.function(jit_compile=True)`",
    "jax.jit": "`jax.jit(jnp.take)`",
    "torch.compile": "`torch.compile(embedding)`",
}

MEMORY_LABELS = dict(MEMORY_CONFIGS)
REVERSE_LABELS = dict(REVERSE_FORMATS)
# `model.quantize("int4")` of a keras-hub model: Keras's default int4 config,
# groups of 128 (the token embedding's policy is `int4/128_from_float32`).
DECODING_LABELS = {
    name: "int4 (groups of 128)" if name == "int4" else REVERSE_LABELS[name]
    for name in DECODING_FORMATS
}


# The training section's variants (training.VARIANTS, and PyTorch's own).
TRAINING_LABELS = {
    "keras": "keras.layers.Embedding, Adam",
    "dense": "ours, optimizer=None (Adam)",
    "sgd": "ours, optimizer='sgd'",
    "adagrad": "ours, optimizer='adagrad'",
    "adam": "ours, optimizer='adam'",
    "lora": "ours + LoRA 8, Adam",
    "lora_adam": "ours + LoRA 8, optimizer='adam'",
    "native": "torch: Embedding(sparse=True), SparseAdam",
}
# Shorter, for table headers.
TRAINING_COLUMNS = {
    "keras": "keras Adam",
    "dense": "ours Adam",
    "sgd": "ours 'sgd'",
    "adagrad": "ours 'adagrad'",
    "adam": "ours 'adam'",
    "lora": "LoRA Adam",
    "lora_adam": "LoRA 'adam'",
    "native": "torch SparseAdam",
}
# The bags section's forward passes (bags.CALLABLES), for table headers.
BAGS_COLUMNS = {
    "ours": "ours dense",
    "ours_flat": "ours flat",
    "embed_reduce": "EmbedReduce",
    "embedding_pool": "Embedding + pool",
    "take_mean": "take + mean",
    "segment_mean": "take + segment_sum",
    "native": "torch EmbeddingBag",
}
# Its ratios (bags.FORWARD_TARGETS and FORWARD_RATIOS).
BAGS_RATIO_COLUMNS = {
    "ours_over_hand_written": "ours / hand-written",
    "ours_flat_over_hand_written": "ours flat / hand-written",
    "ours_over_embed_reduce": "ours / EmbedReduce",
    "ours_flat_over_embed_reduce": "ours flat / EmbedReduce",
    "embedding_pool_over_hand_written": "Embedding + pool / hand-written",
    "ours_over_native": "ours / torch",
    "ours_flat_over_native": "ours flat / torch",
}
# Its training variants (bags.TRAIN_VARIANTS).
BAGS_TRAIN_COLUMNS = {
    "ours": "ours Adam",
    "ours_adam": "ours 'adam'",
    "embed_reduce": "EmbedReduce Adam",
    "native": "torch SparseAdam",
}
BAGS_MEMORY_LABELS = dict(BAGS_MEMORY_CONFIGS)
# The sharded section's configurations (sharded.CONFIGS); shorter, for
# table headers.
SHARDED_LABELS = dict(SHARDED_CONFIGS)
SHARDED_COLUMNS = {
    "keras_dense_adam": "keras Adam",
    "ours_row_sparse_adam": "ours 'adam'",
}
# The layers of the lookup-after-training part (its models train with SGD).
LOOKUP_LAYER_LABELS = {
    "keras": "keras.layers.Embedding",
    "dense": "ours, optimizer=None",
    "sgd": "ours, optimizer='sgd'",
}
LOOKUP_CALL_LABELS = {
    "predict_on_batch": "predict_on_batch",
    "eager": "eager layer(ids)",
}


def native_op(backend, mode):
    name = NATIVE_OPS[mode]
    return name[backend] if isinstance(name, dict) else name


def rows_label(input_dim):
    """`1M`, `100k`, `4M`: short vocabulary sizes for plot labels."""
    if input_dim >= 1_000_000 and input_dim % 1_000_000 == 0:
        return f"{input_dim // 1_000_000}M"
    if input_dim >= 1_000 and input_dim % 1_000 == 0:
        return f"{input_dim // 1_000}k"
    return f"{input_dim:,}"

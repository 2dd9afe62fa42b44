"""What the benchmarks measure: sizes, repetitions and memory configurations.

Shared by `run.py` (which starts the processes and writes the report) and
`bench_backend.py` (which measures); plain data, so that `run.py` never
imports a backend. A full run (`make bench`) uses `FULL`; `--quick` uses
`QUICK`, the same sections at tiny sizes with a few repetitions, to check
that everything runs.
"""

# Every case looks up a `64 x 32` batch of int32 ids in a table of
# `output_dim=128`; LoRA is rank 8.
BATCH_SHAPE = (64, 32)
OUTPUT_DIM = 128
# "No slower than the layer it replaces": the largest ours / Keras time
# ratio of a drop-in row (lookups, int8, LoRA on quantized tables,
# decoding) that still meets its target; the machine's noise is about 10%.
AS_FAST_AS_KERAS = 1.05
LORA_RANK = 8

# The sections of a run, in the order a backend process measures them.
SECTIONS = (
    "native_floor",
    "quantized",
    "vocab_scaling",
    "training",
    "bags",
    "reverse_projection",
    "sharded",
    "memory",
)
# Sections a `--quick` run leaves out unless `--sections` names them: the
# sharded section needs a JAX process of its own with virtual devices.
QUICK_OPT_IN = ("sharded",)

# Peak-memory configurations: (name, label). The layer each one builds is in
# peak_memory.py.
MEMORY_CONFIGS = (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("int8", "int8"),
    ("int4", "int4 (groups of 128)"),
    ("float32_lora", "float32 + LoRA"),
    ("int4_lora", "int4 + LoRA"),
)

# The bags section: a DLRM-like batch of `BAGS_BATCH` bags of 1 to
# `BAGS_MAX_LENGTH` ids (padded with id 0 to `(BAGS_BATCH, BAGS_MAX_LENGTH)`,
# or flat with their lengths), pooled by `combiner="mean"` into vectors of
# `BAGS_OUTPUT_DIM`; LoRA is rank `BAGS_LORA_RANK`. See bags.py.
BAGS_BATCH = 1024
BAGS_MAX_LENGTH = 50
BAGS_OUTPUT_DIM = 64
BAGS_LORA_RANK = 4
# Peak-memory configurations of the bags section: (name, label). "native"
# (torch.nn.EmbeddingBag) is measured on PyTorch only; the layer or function
# each one builds is in bags.py.
BAGS_MEMORY_CONFIGS = (
    ("float32", "ours, float32, dense ids"),
    ("float32_flat", "ours, float32, flat ids + lengths"),
    ("int8", "ours, int8"),
    ("int4", "ours, int4 (groups of 128)"),
    ("float32_lora", "ours, float32 + LoRA 4"),
    ("embedding_pool", "ours Embedding + pooling by hand"),
    ("embed_reduce", "keras-rs EmbedReduce"),
    ("take_mean", "keras.ops: take + masked mean"),
    ("segment_mean", "keras.ops: take + segment_sum"),
    ("native", "torch.nn.EmbeddingBag"),
)
BAGS_NATIVE_BACKEND = "torch"

# The reverse projection of a tied `ReversibleEmbedding` (`layer(h,
# reverse=True)`: logits over the vocabulary) of `output_dim=512`, on hidden
# states of one decoding step of 8 sequences and of a 4 x 64 prompt.
REVERSE_OUTPUT_DIM = 512
REVERSE_HIDDEN_SHAPES = {
    "decode": (8, REVERSE_OUTPUT_DIM),
    "prefill": (4, 64, REVERSE_OUTPUT_DIM),
}
# Table formats of the reverse section: (name, label). LoRA is rank
# LORA_RANK with a non-zero `B`, on the float table; int4 per row is
# `Int4QuantizationConfig(block_size=None)`, int4 grouped `block_size=128`.
# The layers each one builds are in reverse_projection.py.
REVERSE_FORMATS = (
    ("float32", "float32"),
    ("float32_lora", "float32 + LoRA"),
    ("int8", "int8"),
    ("int4", "int4 per row"),
    ("int4_128", "int4 (groups of 128)"),
)
# The formats of the decoding benchmark (a keras-hub causal LM's
# `model.quantize(mode)` or its token embedding's LoRA).
DECODING_FORMATS = ("float32", "float32_lora", "int8", "int4")

# Tables sharded by rows with `keras.distribution` (see sharded.py): JAX only
# (Keras 3 shards variables on JAX alone), in a process of its own with
# `SHARDED_DEVICES` virtual CPU devices (`XLA_FLAGS`), a table of
# `SHARDED_OUTPUT_DIM` looked up by `SHARDED_BATCH_SHAPE` ids. The
# configurations: (name, label).
SHARDED_BACKEND = "jax"
SHARDED_DEVICES = 8
SHARDED_XLA_FLAG = f"--xla_force_host_platform_device_count={SHARDED_DEVICES}"
SHARDED_OUTPUT_DIM = 32
SHARDED_BATCH_SHAPE = (256, 4)
SHARDED_CONFIGS = (
    ("keras_dense_adam", "keras.layers.Embedding, dense Adam"),
    ("ours_row_sparse_adam", "ours, optimizer='adam' (row-sparse)"),
)
# The most a device may hold of a layer's table-sized variables, over their
# total divided by the device count.
SHARDED_TARGET = 1.1

FULL = {
    # Plain lookups against the backend's own gather. The lookup case of the
    # speed table (ours against Keras, `invalid_ids` raise and zeros) is the
    # `lookup_size` point of this section.
    "native_sizes": (100_000, 1_000_000),
    "native_reps": {100_000: 300, 1_000_000: 100},
    "native_warmup": 5,
    "lookup_size": 100_000,
    # torch.compile calls are slower and vary more; fewer repetitions.
    "torch_compile_sizes": (100_000, 1_000_000),
    "torch_compile_reps": 30,
    # int8 / int4 lookups and LoRA on quantized tables.
    "quantized_size": 1_000_000,
    "quantized_reps": 30,
    # Forward and training-step time against the vocabulary size. The
    # lora_forward and lora_train cases of the speed table are the
    # `lora_case_size` point with LoRA. A 4M x 128 float32 table is 2 GiB
    # (4 GiB for both layers), and Keras's LoRA call takes seconds there:
    # few repetitions at the large sizes.
    "scaling_sizes": (10_000, 100_000, 1_000_000, 4_000_000),
    "scaling_reps": {10_000: 30, 100_000: 30, 1_000_000: 15, 4_000_000: 5},
    "lora_case_size": 1_000_000,
    # From this size on, each timed call follows an untimed one (see
    # timing.compare): a Keras call there leaves gigabytes to free.
    "settle_from": 1_000_000,
    # Training big tables: ms per train_on_batch of Input -> Embedding ->
    # GlobalAveragePooling1D -> Dense(1) against the vocabulary size, for
    # Keras's layer and ours, dense and with `optimizer=` (see training.py).
    # With Adam, a 4M x 128 table and its two moments are 6 GiB, and
    # Keras's dense Adam step takes seconds: few repetitions at the large
    # sizes, and from `training_alone_from` on each variant is built, timed
    # and freed alone (not interleaved), so that one model at a time is
    # alive.
    "training_sizes": (10_000, 100_000, 1_000_000, 4_000_000),
    "training_reps": {10_000: 20, 100_000: 15, 1_000_000: 5, 4_000_000: 3},
    "training_alone_from": 4_000_000,
    # The headline's training row.
    "training_case_size": 1_000_000,
    # The bytes of the NumPy copy that measures the memory bandwidth the
    # section's one-pass floor is computed at.
    "bandwidth_bytes": 256 * 2**20,
    # Lookups before and after one training step (SGD): predict_on_batch
    # and an eager call, Keras's layer, ours dense and ours optimizer="sgd".
    "after_training_size": 1_000_000,
    "after_training_reps": 10,
    # Bags of ids (see BAGS_BATCH): forward passes and training steps of
    # EmbeddingBag and its peers at this vocabulary, and the peak memory of
    # one forward pass of each (one fresh process per backend and
    # configuration, as `memory`). A forward pass takes milliseconds; a
    # dense Adam step of a 1M x 64 table (and its moments) a few hundred
    # (PyTorch: about a second).
    "bags_size": 1_000_000,
    "bags_forward_reps": 50,
    "bags_warmup": 3,
    "bags_train_reps": 10,
    # Peak memory of one forward pass: one fresh process per backend,
    # configuration and layer.
    "memory_size": 1_000_000,
    "memory_in_timing_process": False,
    # Before measuring, the resident set size must stay put for 4 polls
    # 0.25 s apart (see peak_memory.wait_for_rss_to_settle).
    "memory_settle_polls": (0.25, 4),
    # The reverse projection: vocabularies of about Llama 3's size (128,256)
    # and Gemma's (256,000 and 262,144); a 256k x 512 float32 table is
    # 500 MiB. Repetitions per hidden-state shape and size; a shape without
    # an entry for a size is not measured there: a prefill call (4 x 64
    # tokens) is compute-bound, 34 GFLOP at 128k rows (about 0.7 s a call
    # on this machine), and at 256k would only double it.
    "reverse_sizes": (128_000, 256_000),
    "reverse_reps": {
        "decode": {128_000: 20, 256_000: 10},
        "prefill": {128_000: 5},
    },
    "reverse_warmup": 2,
    # From this size on, each timed decode call follows an untimed one
    # (Keras's LoRA and int4 calls leave table-sized temporaries to free,
    # which would slow whatever call came next).
    "reverse_settle_from": 128_000,
    # Peak memory of one reverse call on decode hidden states: one fresh
    # process per backend, format and layer (as `memory`).
    "reverse_memory_size": 256_000,
    # Greedy decoding with a 2-layer keras-hub Gemma of this vocabulary:
    # one prompt of `decoding_prompt` tokens, generated to `decoding_length`.
    "decoding_vocab": 128_000,
    "decoding_batch": 1,
    "decoding_prompt": 8,
    "decoding_length": 40,
    "decoding_reps": 5,
    # Tables sharded by rows: per-device bytes of the table and its Adam
    # moments, and ms per train_on_batch, on 1 to 8 devices. A 4M x 32
    # float32 table is 512 MB; Keras's dense Adam holds it, its two moments
    # and a dense gradient (about 2 GB). `sharded_fit_batches` batches of
    # `model.fit` compile the step first.
    "sharded_sizes": (1_000_000, 4_000_000),
    "sharded_device_counts": (1, 2, 4, 8),
    "sharded_fit_batches": 3,
    "sharded_reps": 10,
}

QUICK = {
    "native_sizes": (1_000, 10_000),
    "native_reps": {1_000: 3, 10_000: 3},
    "native_warmup": 1,
    "lookup_size": 10_000,
    # Each torch.compile of a layer takes seconds: one size only.
    "torch_compile_sizes": (10_000,),
    "torch_compile_reps": 3,
    "quantized_size": 10_000,
    "quantized_reps": 3,
    # Two sizes draw a line; at 100,000 rows Keras's LoRA call alone took
    # seconds per backend. The settled path of the full run's large sizes
    # runs from the second size on.
    "scaling_sizes": (1_000, 10_000),
    "scaling_reps": {1_000: 3, 10_000: 3},
    "lora_case_size": 10_000,
    "settle_from": 10_000,
    # Every variant and (TensorFlow) jit mode traces and compiles its own
    # train step, seconds each: one size, each variant built alone (the
    # path of the full run's largest size).
    "training_sizes": (1_000,),
    "training_reps": {1_000: 2},
    "training_alone_from": 1_000,
    "training_case_size": 1_000,
    "bandwidth_bytes": 16 * 2**20,
    # Every callable and mode compiles its own program, every train step
    # its own (TensorFlow: twice): one small vocabulary, few repetitions.
    "bags_size": 10_000,
    "bags_forward_reps": 3,
    "bags_warmup": 1,
    "bags_train_reps": 2,
    "after_training_size": 5_000,
    "after_training_reps": 2,
    # The timing process measures every configuration in turn at the end:
    # no process to start, but memory freed before can serve a later
    # measurement's temporaries unseen, so quick peaks mean little. The size
    # of the first-call setup layer, so that its compiled kernels serve.
    "memory_size": 1_000,
    "memory_in_timing_process": True,
    "memory_settle_polls": (0.05, 2),
    # One size: every format, shape and mode compiles its own programs
    # (60 XLA compilations per size on JAX and TensorFlow). 5,000 rows: our
    # quantized projection reads them in 3 chunks.
    "reverse_sizes": (5_000,),
    "reverse_reps": {"decode": {5_000: 3}, "prefill": {5_000: 3}},
    "reverse_warmup": 1,
    "reverse_settle_from": 5_000,
    # Measured in the timing process, as `memory` (the setup layer's size).
    "reverse_memory_size": 1_000,
    "decoding_vocab": 1_000,
    "decoding_batch": 1,
    "decoding_prompt": 4,
    "decoding_length": 8,
    "decoding_reps": 2,
    # One small vocabulary, one device against all of them.
    "sharded_sizes": (100_000,),
    "sharded_device_counts": (1, SHARDED_DEVICES),
    "sharded_fit_batches": 2,
    "sharded_reps": 3,
}


def plan(quick):
    return QUICK if quick else FULL

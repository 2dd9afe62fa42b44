"""Bags of ids: `EmbeddingBag` against keras-rs `EmbedReduce`, hand-written
`keras.ops` and, on PyTorch, `torch.nn.EmbeddingBag`.

A DLRM-like batch (`make_batch`): `BAGS_BATCH` bags of 1 to
`BAGS_MAX_LENGTH` ids (lengths uniform, ids uniform in `[1, V)`, a fixed
seed), as dense ids padded with id 0 `(batch, BAGS_MAX_LENGTH)` and as flat
ids with the bags' lengths; every layer pools with `combiner="mean"` into
vectors of `BAGS_OUTPUT_DIM`.

Forward passes (`CALLABLES`), all holding the same table and checked equal
before anything is timed, eager and in each compiled mode of the backend
(`layers.forwards`):
- "ours": `EmbeddingBag(V, 64, combiner="mean", mask_zero=True)` on the
  dense ids; "ours_flat": the same layer on the flat ids with `lengths=`;
- "embed_reduce": keras-rs `EmbedReduce(V, 64, combiner="mean")` on the
  dense ids, the peer layer. It counts the padding id 0 in its mean (with
  or without `mask_zero=True`), so its output is checked against that mean
  instead;
- "embedding_pool": our `Embedding` lookup, then the masked mean by hand;
- "take_mean" and "segment_mean": hand-written `keras.ops` on a plain
  variable, `ops.take` then the masked mean over the dense ids, or
  `ops.segment_sum` over the flat ids (given their bag ids, as an input
  pipeline would); the faster of the two is "hand-written keras.ops";
- "native" (PyTorch): `torch.nn.EmbeddingBag(V, 64, mode="mean")` on the
  flat ids and the bags' start offsets, the floor.

Training steps (`train_variants`): one `train_on_batch` of `Input((50,),
int32) -> bag layer -> Dense(1)`, MSE, the model compiled with Adam, for
ours trained densely by it ("ours"), ours with `optimizer="adam"`
("ours_adam": the table steps only the looked-up rows) and `EmbedReduce`
(dense); on PyTorch also `torch.nn.EmbeddingBag(sparse=True)` +
`nn.Linear` stepped by `SparseAdam` and `Adam` ("native").

Peak memory (`measure_memory`): the peak resident memory one eager forward
pass adds, per configuration (`BAGS_MEMORY_CONFIGS`), measured as
`peak_memory.measure` does: no format of ours may make a table-sized
temporary.
"""

import keras
import keras_rs
import numpy as np
from keras import ops
from layers import forwards, variable_bytes
from peak_memory import (
    peak_rss_mb,
    reset_peak_rss,
    wait_for_rss_to_settle,
)
from plan import (
    BAGS_BATCH,
    BAGS_LORA_RANK,
    BAGS_MAX_LENGTH,
    BAGS_NATIVE_BACKEND,
    BAGS_OUTPUT_DIM,
)
from timing import BACKEND, SEED, block, compare, release_memory, timed
from training import (
    LEARNING_RATE,
    LOSS_RTOL,
    custom_gradients,
    first_step,
    forget_custom_gradients,
    kernel_initializer,
    modes,
    table_initializer,
    warmup_for,
)

import keras_ext_embedding

# The forward passes of a mode; "native" on PyTorch only.
CALLABLES = (
    "ours",
    "ours_flat",
    "embed_reduce",
    "embedding_pool",
    "take_mean",
    "segment_mean",
    "native",
)
# The two hand-written keras.ops forms; the faster one is the reference.
HAND_WRITTEN = ("take_mean", "segment_mean")
# ratio name: (numerator, denominator, most it may be). Ours on both forms
# within 1.3x of the best hand-written keras.ops, and ours on the dense ids
# no slower than EmbedReduce on the same ids.
FORWARD_TARGETS = {
    "ours_over_hand_written": ("ours", "hand_written", 1.3),
    "ours_flat_over_hand_written": ("ours_flat", "hand_written", 1.3),
    "ours_over_embed_reduce": ("ours", "embed_reduce", 1.0),
}
# Ratios for information.
FORWARD_RATIOS = {
    "ours_flat_over_embed_reduce": ("ours_flat", "embed_reduce"),
    "embedding_pool_over_hand_written": ("embedding_pool", "hand_written"),
    "ours_over_native": ("ours", "native"),
    "ours_flat_over_native": ("ours_flat", "native"),
    "hand_written_over_native": ("hand_written", "native"),
}
# The training variants; "native" on PyTorch only.
TRAIN_VARIANTS = ("ours", "ours_adam", "embed_reduce", "native")
# A row-sparse Adam step must be at least this many times faster than
# EmbedReduce's dense one where XLA compiles the step (it writes the
# looked-up rows in place); elsewhere for information.
TRAIN_SPEEDUP = 20
TRAIN_TARGET_MODES = (
    "train_on_batch (jax.jit)",
    "train_on_batch (tf.function XLA)",
)
# Memory configurations that are ours (the others are for comparison):
# those must add no table-sized temporary.
OURS_MEMORY = ("float32", "float32_flat", "int8", "int4", "float32_lora")
# The quantized configurations' dtype policies.
MEMORY_POLICIES = {"int8": "int8_from_float32", "int4": "int4/128_from_float32"}
# The call of a memory configuration, where it is not on the dense ids.
MEMORY_ARGUMENTS = {"float32_flat": "ours_flat"}


def callables():
    """The forward passes this backend measures."""
    return tuple(n for n in CALLABLES if n != "native" or has_native())


def train_variants():
    """The training variants this backend measures."""
    return tuple(n for n in TRAIN_VARIANTS if n != "native" or has_native())


def has_native():
    return BACKEND == BAGS_NATIVE_BACKEND


def make_batch(input_dim):
    """The batch as NumPy: `dense` ids `(batch, BAGS_MAX_LENGTH)` padded
    with 0, the same ids `flat` with the bags' `lengths`, their `starts`
    (torch's offsets) and the bag of each flat id (`segment_ids`). The
    lengths are the same at every vocabulary size."""
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(1, BAGS_MAX_LENGTH + 1, size=BAGS_BATCH).astype("int32")
    # From 1: id 0 is the padding id.
    flat = rng.integers(1, input_dim, size=int(lengths.sum())).astype("int32")
    dense = np.zeros((BAGS_BATCH, BAGS_MAX_LENGTH), "int32")
    # Row-major: each bag's ids, in order, then its padding.
    dense[np.arange(BAGS_MAX_LENGTH) < lengths[:, None]] = flat
    return {
        "dense": dense,
        "flat": flat,
        "lengths": lengths,
        "starts": (np.cumsum(lengths) - lengths).astype("int32"),
        "segment_ids": np.repeat(np.arange(BAGS_BATCH, dtype="int32"), lengths),
    }


def masked_mean(rows, ids):
    """The mean of each bag's rows `(batch, length, dim)` over its ids other
    than the padding id 0 (zeros for a bag of padding only)."""
    kept = ops.cast(ops.not_equal(ids, 0), rows.dtype)
    total = ops.sum(ops.multiply(rows, ops.expand_dims(kept, -1)), axis=-2)
    count = ops.sum(kept, axis=-1, keepdims=True)
    return ops.divide(total, ops.maximum(count, 1))


class TakeMean(keras.layers.Layer):
    """Hand-written keras.ops on dense ids: `ops.take` of a plain variable,
    then the masked mean. A layer only so that it compiles as the others do
    (`layers.forwards`: the table is an argument of the jitted function)."""

    def __init__(self, input_dim, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim

    def build(self, input_shape=None):
        self.table = self.add_weight(
            shape=(self.input_dim, BAGS_OUTPUT_DIM), initializer="uniform", name="table"
        )

    def call(self, ids):
        return masked_mean(ops.take(self.table, ids, axis=0), ids)


class SegmentMean(TakeMean):
    """Hand-written keras.ops on flat ids: `ops.take`, then `segment_sum`
    over the bag of each id, divided by the bags' lengths."""

    def call(self, flat_ids, segment_ids, lengths):
        rows = ops.take(self.table, flat_ids, axis=0)
        total = ops.segment_sum(rows, segment_ids, num_segments=lengths.shape[0])
        count = ops.cast(ops.expand_dims(lengths, -1), total.dtype)
        return ops.divide(total, ops.maximum(count, 1))


class EmbeddingPool(keras.layers.Layer):
    """Our `Embedding` lookup, then the masked mean by hand: what a bag
    costs without `EmbeddingBag`."""

    def __init__(self, input_dim, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras_ext_embedding.Embedding(input_dim, BAGS_OUTPUT_DIM)

    def build(self, input_shape=None):
        self.embedding.build()

    def call(self, ids):
        return masked_mean(self.embedding(ids), ids)


def embedding_bag(input_dim, **kwargs):
    return keras_ext_embedding.EmbeddingBag(
        input_dim, BAGS_OUTPUT_DIM, combiner="mean", mask_zero=True, **kwargs
    )


def embed_reduce(input_dim, **kwargs):
    return keras_rs.layers.EmbedReduce(
        input_dim, BAGS_OUTPUT_DIM, combiner="mean", **kwargs
    )


def native_bag(values, **kwargs):
    """`torch.nn.EmbeddingBag` holding `values` (NumPy)."""
    import torch

    return torch.nn.EmbeddingBag.from_pretrained(
        torch.from_numpy(values), mode="mean", **kwargs
    )


def batch_tensors(batch):
    """The batch as backend tensors (and, on PyTorch, torch's own inputs
    for the native module: the flat ids and the bags' start offsets)."""
    tensors = {name: ops.convert_to_tensor(array) for name, array in batch.items()}
    if has_native():
        import torch

        tensors["native"] = (
            torch.from_numpy(batch["flat"]),
            torch.from_numpy(batch["starts"]),
        )
    return tensors


def arguments(name, tensors):
    """`(args, kwargs)` of the callable `name` on the batch."""
    if name == "ours_flat":
        return (tensors["flat"],), {"lengths": tensors["lengths"]}
    if name == "segment_mean":
        return tuple(tensors[n] for n in ("flat", "segment_ids", "lengths")), {}
    if name == "native":
        return tensors["native"], {}
    return (tensors["dense"],), {}


def forward_subjects(input_dim):
    """`({name: layer or module}, values)`: every forward subject, holding
    the same table `values` (NumPy); "ours" and "ours_flat" are one layer.

    Copied through NumPy: on JAX, assigning a variable itself would share
    one buffer between the layers."""
    ours = embedding_bag(input_dim)
    ours.build()
    values = ops.convert_to_numpy(ours.embeddings)
    peer = embed_reduce(input_dim)
    peer.build()
    peer.embeddings.assign(values)
    pool = EmbeddingPool(input_dim)
    pool.build()
    pool.embedding.embeddings.assign(values)
    take, segment = TakeMean(input_dim), SegmentMean(input_dim)
    for layer in (take, segment):
        layer.build()
        layer.table.assign(values)
    subjects = {
        "ours": ours,
        "ours_flat": ours,
        "embed_reduce": peer,
        "embedding_pool": pool,
        "take_mean": take,
        "segment_mean": segment,
    }
    if has_native():
        subjects["native"] = native_bag(values, freeze=True)
    return subjects, values


def bound(function, args, kwargs):
    return lambda: function(*args, **kwargs)


def mode_calls(subjects, tensors):
    """`{mode: {name: zero-argument callable}}`: each subject eager and in
    the backend's compiled modes (the native module: eager only)."""
    calls = {}
    for name, subject in subjects.items():
        args, kwargs = arguments(name, tensors)
        by_mode = {"eager": subject} if name == "native" else forwards(subject)
        for mode, function in by_mode.items():
            calls.setdefault(mode, {})[name] = bound(function, args, kwargs)
    return calls


def check_outputs(calls, values, batch):
    """Guards the timings: every callable pools the same bags (EmbedReduce:
    the mean counting the padding rows, which it includes)."""
    expected = ops.convert_to_numpy(calls["ours"]())
    padded_mean = values[batch["dense"]].mean(axis=1)
    for name, call in calls.items():
        reference = padded_mean if name == "embed_reduce" else expected
        np.testing.assert_allclose(
            ops.convert_to_numpy(call()),
            reference,
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )


def forward_ratios(result, quick):
    """The ratios of medians, the reference hand-written form, and which
    targets are met (None in a quick run)."""
    medians = {name: summary["median_ms"] for name, summary in result.items()}
    hand_written = min(HAND_WRITTEN, key=medians.get)
    medians["hand_written"] = medians[hand_written]
    ratios, met = {}, {}
    for ratio, (top, bottom, most) in FORWARD_TARGETS.items():
        ratios[ratio] = medians[top] / medians[bottom]
        met[ratio] = None if quick else ratios[ratio] <= most
    for ratio, (top, bottom) in FORWARD_RATIOS.items():
        if top in medians and bottom in medians:
            ratios[ratio] = medians[top] / medians[bottom]
    targets = {ratio: f"<= {most}" for ratio, (_, _, most) in FORWARD_TARGETS.items()}
    return {
        "hand_written": hand_written,
        "ratios": ratios,
        "targets": targets,
        "met": met,
    }


def bench_forward(plan, quick, report):
    input_dim = plan["bags_size"]
    batch = make_batch(input_dim)
    subjects, values = forward_subjects(input_dim)
    calls = mode_calls(subjects, batch_tensors(batch))
    for mode, by_name in calls.items():
        # The first call of a compiled mode traces and compiles.
        first = {name: timed(call) for name, call in by_name.items()}
        check_outputs(by_name, values, batch)
        result = compare(by_name, plan["bags_forward_reps"], plan["bags_warmup"])
        report(
            input_dim=input_dim,
            mode=mode,
            batch=BAGS_BATCH,
            max_length=BAGS_MAX_LENGTH,
            ids=len(batch["flat"]),
            **result,
            **forward_ratios(result, quick),
            first_call_s=first,
        )
    del subjects, values, calls
    release_memory()


def train_model(layer, jit_compile):
    """`Input((BAGS_MAX_LENGTH,), int32) -> layer -> Dense(1)`, MSE, Adam."""
    inputs = keras.Input((BAGS_MAX_LENGTH,), dtype="int32")
    pooled = layer(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer=kernel_initializer())(pooled)
    model = keras.Model(inputs, outputs)
    options = {} if jit_compile is None else {"jit_compile": jit_compile}
    model.compile(keras.optimizers.Adam(LEARNING_RATE), "mse", **options)
    return model


def train_layer(name, input_dim):
    """The variant's bag layer, from the seeded table initializer shared by
    every variant (and the native module)."""
    initializer = table_initializer()
    if name == "embed_reduce":
        return embed_reduce(input_dim, embeddings_initializer=initializer)
    options = {"optimizer": "adam"} if name == "ours_adam" else {}
    return embedding_bag(input_dim, embeddings_initializer=initializer, **options)


def targets():
    rng = np.random.default_rng(SEED)
    return rng.normal(size=(BAGS_BATCH, 1)).astype("float32")


def native_train_step(input_dim, batch, y):
    """PyTorch's own sparse bag training, the floor of the layers' steps:
    `nn.EmbeddingBag(mode="mean", sparse=True)` on the flat ids and offsets
    + `nn.Linear`, SparseAdam for the table and Adam for the linear layer;
    one step is zero_grad, forward, MSE, backward and both optimizers'
    steps. It holds the layers' initial table and kernel."""
    import torch

    table = ops.convert_to_numpy(table_initializer()((input_dim, BAGS_OUTPUT_DIM)))
    kernel = ops.convert_to_numpy(kernel_initializer()((BAGS_OUTPUT_DIM, 1)))
    bag = native_bag(table, freeze=False, sparse=True)
    linear = torch.nn.Linear(BAGS_OUTPUT_DIM, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T))
        linear.bias.zero_()
    optimizers = [
        torch.optim.SparseAdam(bag.parameters(), lr=LEARNING_RATE),
        torch.optim.Adam(linear.parameters(), lr=LEARNING_RATE),
    ]
    flat, starts = (torch.from_numpy(batch[n]) for n in ("flat", "starts"))
    y = torch.from_numpy(y)

    def step():
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(linear(bag(flat, starts)), y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.item()

    return step


def train_step(name, input_dim, batch, y, jit_compile):
    """A zero-argument training step; it returns the loss as a Python float
    (the step has finished)."""
    if name == "native":
        return native_train_step(input_dim, batch, y)
    model = train_model(train_layer(name, input_dim), jit_compile)
    dense = batch["dense"]
    return lambda: model.train_on_batch(dense, y)


def check_losses(losses, where):
    """Ours, dense and row-sparse, and the native module start from the same
    weights on the same bags: the same first loss. EmbedReduce's differs (it
    averages the padding rows in)."""
    for name, loss in losses.items():
        if name != "embed_reduce":
            np.testing.assert_allclose(
                loss, losses["ours"], rtol=LOSS_RTOL, err_msg=f"{where}: {name}"
            )


def train_ratios(result, mode, quick):
    medians = {name: summary["median_ms"] for name, summary in result.items()}
    ratios = {
        "embed_reduce_over_ours_adam": medians["embed_reduce"] / medians["ours_adam"],
        "ours_over_ours_adam": medians["ours"] / medians["ours_adam"],
    }
    if "native" in medians:
        ratios["ours_adam_over_native"] = medians["ours_adam"] / medians["native"]
        ratios["embed_reduce_over_native"] = medians["embed_reduce"] / medians["native"]
    if mode in TRAIN_TARGET_MODES:
        target = f"EmbedReduce / ours 'adam' >= {TRAIN_SPEEDUP}x"
        met = None if quick else ratios["embed_reduce_over_ours_adam"] >= TRAIN_SPEEDUP
    else:
        target, met = "none (for information)", None
    return {"ratios": ratios, "target": target, "met": met}


def bench_training(plan, quick, report):
    input_dim = plan["bags_size"]
    batch = make_batch(input_dim)
    y = targets()
    for mode, jit_compile in modes().items():
        registered = custom_gradients()
        steps = {
            name: train_step(name, input_dim, batch, y, jit_compile)
            for name in train_variants()
        }
        losses, first = {}, {}
        for name, step in steps.items():
            losses[name], first[name] = first_step(step)
        check_losses(losses, f"bags {input_dim:,} rows {mode}")
        # From plan["settle_from"] on, a dense step leaves a table's worth of
        # buffers to free after it returns: each timed step follows an
        # untimed one, as in training.py.
        result = compare(
            steps,
            plan["bags_train_reps"],
            warmup_for(input_dim),
            settle=input_dim >= plan["settle_from"],
        )
        del steps
        forget_custom_gradients(registered)
        release_memory()
        report(
            input_dim=input_dim,
            mode=mode,
            **result,
            **train_ratios(result, mode, quick),
            first_call_s=first,
            first_loss=losses,
        )


def bench(plan, quick, report_forward, report_train):
    bench_forward(plan, quick, report_forward)
    bench_training(plan, quick, report_train)


# The memory configurations that are not an EmbeddingBag (nor native).
MEMORY_LAYERS = {
    "embedding_pool": EmbeddingPool,
    "embed_reduce": embed_reduce,
    "take_mean": TakeMean,
    "segment_mean": SegmentMean,
}


def memory_layer(config, input_dim):
    """The layer of a memory configuration, built (None for "native").

    Quantized layers are built directly in their dtype policy, as in
    peak_memory.py: `quantize("int8")` of a float table would leave
    TensorFlow's allocator holding the freed float table, and the forward
    pass's temporaries would reuse it unseen. `int4/128` is what
    `quantize("int4")` makes."""
    if config in ("float32", "float32_flat", "float32_lora"):
        layer = embedding_bag(input_dim)
    elif config in MEMORY_POLICIES:
        layer = embedding_bag(input_dim, dtype=MEMORY_POLICIES[config])
    elif config in MEMORY_LAYERS:
        layer = MEMORY_LAYERS[config](input_dim)
    else:
        return None
    if not layer.built:
        layer.build()
    if config == "float32_lora":
        layer.enable_lora(BAGS_LORA_RANK)
        # B starts at zero; a non-zero one makes the delta real work.
        rng = np.random.default_rng(SEED)
        b = rng.normal(size=(BAGS_LORA_RANK, BAGS_OUTPUT_DIM)) * 0.01
        layer.lora_embeddings_b.assign(b.astype("float32"))
    return layer


def memory_subject(config, input_dim, tensors):
    """`(call, table bytes)`: one eager forward pass of the configuration on
    the batch, and the bytes of the variables it reads."""
    args, kwargs = arguments(MEMORY_ARGUMENTS.get(config, config), tensors)
    layer = memory_layer(config, input_dim)
    if layer is None:
        # Filled, not np.zeros: untouched pages of a zeroed array would
        # become resident only when the forward pass reads them.
        values = np.full((input_dim, BAGS_OUTPUT_DIM), 0.01, "float32")
        module = native_bag(values, freeze=True)
        return (lambda: module(*args)), values.nbytes
    block([variable.value for variable in layer.weights])
    return (lambda: layer(*args, **kwargs)), variable_bytes(layer)


def measure_memory(config, input_dim, settle_polls):
    """One entry: the variable bytes and the peak RSS increase of one eager
    forward pass of the configuration, as peak_memory.measure."""
    # First-call setup (kernels, dispatch caches) outside the measured window.
    setup, _ = memory_subject(config, 1000, batch_tensors(make_batch(1000)))
    block(setup())
    del setup
    tensors = batch_tensors(make_batch(input_dim))
    call, table_bytes = memory_subject(config, input_dim, tensors)
    release_memory()
    wait_for_rss_to_settle(*settle_polls)
    was_reset = reset_peak_rss()
    before_peak = peak_rss_mb()
    outputs = block(call())
    after_peak = peak_rss_mb()
    entry = {
        "config": config,
        "ours": config in OURS_MEMORY,
        "input_dim": input_dim,
        "table_bytes": table_bytes,
        # A float32 input_dim x output_dim array, for every format: a LoRA
        # delta added to the table, or a dequantized table. (Not an int4
        # table unpacked to int8, a quarter of it: at 1M rows, 61 MiB, what
        # an eager pass's own temporaries add up to, several arrays of the
        # batch's 51,200 x 64 float32 rows, 12.5 MiB each.)
        "temporary_mb": input_dim * BAGS_OUTPUT_DIM * 4 / 2**20,
        "output_mb": float(np.prod(ops.shape(outputs))) * 4 / 2**20,
        "peak_before_mb": before_peak,
        "peak_after_mb": after_peak,
        "peak_increase_mb": after_peak - before_peak,
        "peak_was_reset": was_reset,
    }
    del call, outputs
    release_memory()
    return entry

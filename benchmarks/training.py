"""Training big tables: the time of one training step against the vocabulary
size, and of lookups after a training step.

The model is `Input((32,), int32) -> Embedding(V, 128) ->
GlobalAveragePooling1D -> Dense(1)`, MSE, one `train_on_batch` of the
`64 x 32` ids per repetition, the model compiled with Adam. The variants
(`VARIANTS`): `keras.layers.Embedding`, trained densely by the model's Adam;
ours with `optimizer=None` (the same dense training); ours with
`optimizer="sgd"`, `"adagrad"` and `"adam"` (the table steps only the
looked-up rows with its own rule, the model's Adam trains the Dense layer);
and ours with LoRA rank 8, dense and with `optimizer="adam"` (the adapter
`A` then trains row-sparsely). On PyTorch, the native floor as well: a
plain `torch.nn` module, `nn.Embedding(V, 128, sparse=True)` + mean +
`nn.Linear(128, 1)`, stepped by `torch.optim.SparseAdam` and `Adam`. On
TensorFlow, every variant runs in both `compile(jit_compile=False)` and
`jit_compile=True`.

Every variant starts from the same weights (seeded initializers, the native
module given the same arrays), and the first step's losses are checked
equal before anything is timed. One size is built at a time and freed
before the next; from `plan["training_alone_from"]` on, one variant at a
time (a 4M x 128 table with Adam's moments is 6 GiB), otherwise all the
variants of a mode are timed together, in rotating order.

The floor a step cannot beat is one pass over the bytes it must read and
write, at the memory bandwidth a NumPy copy reaches in this process: a
dense Adam step reads and writes the table and its two moments (`6 x V x
128 x 4` bytes); a row-sparse Adam step only the batch's distinct rows of
them.

The lookup part times `predict_on_batch` and an eager `layer(ids)` before
and after one `train_on_batch` with SGD, for Keras's layer, ours dense and
ours with `optimizer="sgd"`: on TensorFlow, Keras's SGD applies the
`IndexedSlices` gradient of a dense table as a sparse update, after which a
dense read of the variable copies the whole table.
"""

import time

import keras
import numpy as np
from keras import ops
from plan import BATCH_SHAPE, LORA_RANK, OUTPUT_DIM
from timing import BACKEND, SEED, block, compare, make_ids, release_memory

import keras_ext_embedding

# name: the keyword arguments of ours (None: keras.layers.Embedding).
VARIANTS = {
    "keras": None,
    "dense": {},
    "sgd": {"optimizer": "sgd"},
    "adagrad": {"optimizer": "adagrad"},
    "adam": {"optimizer": "adam"},
    "lora": {"lora_rank": LORA_RANK},
    "lora_adam": {"lora_rank": LORA_RANK, "optimizer": "adam"},
}
# PyTorch's own sparse embedding training (torch branch only).
NATIVE = "native"
# The variants of the lookup-after-training part.
LOOKUP_VARIANTS = ("keras", "dense", "sgd")
LOOKUP_CALLS = ("predict_on_batch", "eager")
LOOKUP_TIMES = ("before", "after")
# The model's learning rate, Keras's Adam default (the native module's too).
LEARNING_RATE = 1e-3
# Float32 bytes per value, and Adam's arrays per row: table and 2 moments.
VALUE_BYTES = 4
ADAM_ARRAYS = 3
# First-step losses of the variants agree within float32 rounding.
LOSS_RTOL = 1e-4


def variants():
    """The variants this backend measures."""
    return (*VARIANTS, *((NATIVE,) if BACKEND == "torch" else ()))


def modes():
    """`{mode label: compile's jit_compile (None: Keras's default)}`."""
    if BACKEND == "tensorflow":
        return {
            "train_on_batch (tf.function)": False,
            "train_on_batch (tf.function XLA)": True,
        }
    if BACKEND == "jax":
        return {"train_on_batch (jax.jit)": None}
    return {"train_on_batch (eager)": None}


def table_initializer():
    """Keras's default `uniform` range, seeded: every variant (and the
    native module) starts from the same table."""
    return keras.initializers.RandomUniform(-0.05, 0.05, seed=SEED)


def kernel_initializer():
    return keras.initializers.GlorotUniform(seed=SEED + 1)


def targets():
    rng = np.random.default_rng(SEED)
    return rng.normal(size=(BATCH_SHAPE[0], 1)).astype("float32")


def embedding(name, input_dim):
    kwargs = VARIANTS[name]
    initializer = table_initializer()
    if kwargs is None:
        return keras.layers.Embedding(
            input_dim, OUTPUT_DIM, embeddings_initializer=initializer
        )
    return keras_ext_embedding.Embedding(
        input_dim, OUTPUT_DIM, embeddings_initializer=initializer, **kwargs
    )


def build_model(layer, optimizer, jit_compile=None):
    """`Input -> layer -> GlobalAveragePooling1D -> Dense(1)`, MSE."""
    inputs = keras.Input(BATCH_SHAPE[1:], dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    outputs = keras.layers.Dense(1, kernel_initializer=kernel_initializer())(pooled)
    model = keras.Model(inputs, outputs)
    options = {} if jit_compile is None else {"jit_compile": jit_compile}
    model.compile(optimizer=optimizer, loss="mse", **options)
    return model


def keras_step(name, input_dim, ids, y, jit_compile):
    """A zero-argument training step of the variant's model: one
    `train_on_batch`, which returns the loss as a Python float (the step
    has finished)."""
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    model = build_model(embedding(name, input_dim), optimizer, jit_compile)
    return lambda: model.train_on_batch(ids, y)


def native_step(input_dim, ids, y):
    """PyTorch's own sparse embedding training, the floor of the layers'
    steps: `nn.Embedding(sparse=True)` + mean + `nn.Linear`, SparseAdam for
    the table, Adam for the linear layer; one step is zero_grad, forward,
    MSE, backward and both optimizers' steps. It holds the layers' initial
    table and kernel."""
    import torch

    table = ops.convert_to_numpy(table_initializer()((input_dim, OUTPUT_DIM)))
    kernel = ops.convert_to_numpy(kernel_initializer()((OUTPUT_DIM, 1)))

    class Model(torch.nn.Module):
        def __init__(self, table, kernel):
            super().__init__()
            self.embedding = torch.nn.Embedding.from_pretrained(
                torch.from_numpy(table), freeze=False, sparse=True
            )
            self.linear = torch.nn.Linear(OUTPUT_DIM, 1)
            with torch.no_grad():
                self.linear.weight.copy_(torch.from_numpy(kernel.T))
                self.linear.bias.zero_()

        def forward(self, ids):
            return self.linear(self.embedding(ids).mean(dim=1))

    model = Model(table, kernel)
    del table
    optimizers = [
        torch.optim.SparseAdam(model.embedding.parameters(), lr=LEARNING_RATE),
        torch.optim.Adam(model.linear.parameters(), lr=LEARNING_RATE),
    ]
    ids = torch.from_numpy(ids).long()
    y = torch.from_numpy(y)

    def step():
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids), y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.item()

    return step


def make_step(name, input_dim, ids, y, jit_compile):
    if name == NATIVE:
        return native_step(input_dim, ids, y)
    return keras_step(name, input_dim, ids, y, jit_compile)


def custom_gradients():
    """The names in TensorFlow's global gradient registry (None elsewhere),
    for `forget_custom_gradients`."""
    if BACKEND != "tensorflow":
        return None
    from tensorflow.python.framework import ops as tf_ops

    return set(tf_ops._gradient_registry._registry)


def forget_custom_gradients(before):
    """Drops the custom gradients TensorFlow registered since `before`, once
    the models that traced them are deleted.

    Each trace of a `tf.custom_gradient` (ours with `optimizer=`) registers
    its gradient function in TensorFlow's global gradient registry, for
    good: it pins the traced graph and the variables it captured
    (tensorflow/tensorflow#27492, #97697). Without this, every row-sparse
    model would keep its table and slots after being freed: a 1M-row run
    of this section grew by 7 GiB, and the 4M-row models would not fit.
    """
    if before is None:
        return
    from tensorflow.python.framework import ops as tf_ops

    registry = tf_ops._gradient_registry._registry
    for name in set(registry) - before:
        if name.startswith("CustomGradient"):
            del registry[name]


def first_step(step):
    """`(loss, seconds)` of the first call, which traces and compiles."""
    start = time.perf_counter()
    loss = float(np.asarray(block(step())))
    return loss, time.perf_counter() - start


def check_losses(losses, where):
    """Guards the timings: every variant computes the same model (the same
    weights give the same first loss)."""
    reference = losses["keras"]
    for name, loss in losses.items():
        np.testing.assert_allclose(
            loss, reference, rtol=LOSS_RTOL, err_msg=f"{where}: {name}"
        )


def warmup_for(input_dim):
    # After the first call: one more untimed call, none where a call takes
    # a second or more.
    return 0 if input_dim >= 1_000_000 else 1


def memory_bandwidth(size_bytes, reps=5):
    """Bytes per second a NumPy copy of `size_bytes` reads and writes."""
    source = np.ones(size_bytes // VALUE_BYTES, dtype="float32")
    target = np.empty_like(source)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - start)
    del source, target
    return 2 * size_bytes / float(np.median(seconds))


def floor_ms(input_dim, unique_ids, bandwidth):
    """One pass over the bytes an Adam step must read and write, in ms: the
    dense step reads and writes the whole table and both moments, the
    row-sparse step only the batch's distinct rows of them."""
    row_bytes = 2 * ADAM_ARRAYS * OUTPUT_DIM * VALUE_BYTES
    return {
        "dense_adam": input_dim * row_bytes / bandwidth * 1000,
        "row_sparse_adam": unique_ids * row_bytes / bandwidth * 1000,
    }


def time_steps(plan, input_dim, ids, y, jit_compile, where):
    """`({name: summary}, {name: first call seconds}, interleaved)`."""
    reps = plan["training_reps"][input_dim]
    warmup = warmup_for(input_dim)
    alone = input_dim >= plan["training_alone_from"]
    settle = not alone and input_dim >= plan["settle_from"]
    names = variants()
    losses, first_s, result = {}, {}, {}
    if alone:
        for name in names:
            registered = custom_gradients()
            step = make_step(name, input_dim, ids, y, jit_compile)
            losses[name], first_s[name] = first_step(step)
            result.update(compare({name: step}, reps, warmup))
            del step
            forget_custom_gradients(registered)
            release_memory()
    else:
        registered = custom_gradients()
        steps = {n: make_step(n, input_dim, ids, y, jit_compile) for n in names}
        for name, step in steps.items():
            losses[name], first_s[name] = first_step(step)
        result = compare(steps, reps, warmup, settle=settle)
        del steps
        forget_custom_gradients(registered)
        release_memory()
    check_losses(losses, where)
    return result, first_s, not alone


def measure_size(plan, input_dim, bandwidth, report):
    ids = make_ids(input_dim)
    y = targets()
    unique_ids = len(np.unique(ids))
    for mode, jit_compile in modes().items():
        where = f"{input_dim:,} rows {mode}"
        result, first_s, interleaved = time_steps(
            plan, input_dim, ids, y, jit_compile, where
        )
        keras_ms = result["keras"]["median_ms"]
        report(
            input_dim=input_dim,
            mode=mode,
            **result,
            over_keras={n: s["median_ms"] / keras_ms for n, s in result.items()},
            first_call_s=first_s,
            interleaved=interleaved,
            unique_ids=unique_ids,
            bandwidth_gb_s=bandwidth / 1e9,
            floor_ms=floor_ms(input_dim, unique_ids, bandwidth),
        )


def lookup_models(input_dim):
    """`{(name, call): (model, layer)}`: a fresh model for each lookup
    variant and call, compiled with SGD and Keras's default execution.

    One model per call: on TensorFlow, a sparse read of a variable (a
    gather from the variable itself) switches it to copy-on-read as a
    sparse update does, so an eager call would change what
    `predict_on_batch` of the same model measures."""
    models = {}
    for name in LOOKUP_VARIANTS:
        for call in LOOKUP_CALLS:
            layer = embedding(name, input_dim)
            model = build_model(layer, keras.optimizers.SGD(0.01))
            models[name, call] = (model, layer)
    return models


def lookup_calls(models, ids):
    """`{(name, call): callable}`: `predict_on_batch` of the NumPy ids, or
    the layer's eager call on them as a backend tensor."""
    tensor = ops.convert_to_tensor(ids)
    calls = {}
    for (name, call), (model, layer) in models.items():
        if call == "predict_on_batch":
            calls[name, call] = lambda model=model: model.predict_on_batch(ids)
        else:
            calls[name, call] = lambda layer=layer: layer(tensor)
    return calls


def time_lookups(calls, reps):
    """`compare` of the `(name, call)` callables, by their pair."""
    named = {f"{name} {call}": f for (name, call), f in calls.items()}
    result = compare(named, reps, warmup=2)
    return {pair: result[f"{pair[0]} {pair[1]}"] for pair in calls}


def bench_lookups(plan, report):
    input_dim = plan["after_training_size"]
    reps = plan["after_training_reps"]
    ids = make_ids(input_dim)
    registered = custom_gradients()
    models = lookup_models(input_dim)
    calls = lookup_calls(models, ids)
    before = time_lookups(calls, reps)
    for model, _ in models.values():
        model.train_on_batch(ids, targets())
    after = time_lookups(calls, reps)
    for name, call in calls:
        report(
            input_dim=input_dim,
            variant=name,
            call=call,
            before=before[name, call],
            after=after[name, call],
            slowdown=after[name, call]["median_ms"] / before[name, call]["median_ms"],
        )
    del models, calls
    forget_custom_gradients(registered)
    release_memory()


def bench(plan, report, report_lookup):
    bandwidth = memory_bandwidth(plan["bandwidth_bytes"])
    for input_dim in plan["training_sizes"]:
        measure_size(plan, input_dim, bandwidth, report)
    bench_lookups(plan, report_lookup)

"""Tables sharded by rows with `keras.distribution`: the bytes each device
holds of a table and its Adam moments, and the time of a training step, on
1 to 8 devices.

JAX only (Keras 3 shards variables on JAX alone), in a process of its own
started with `XLA_FLAGS=--xla_force_host_platform_device_count=8`: 8
virtual CPU devices, which share the machine's cores.

For each device count `n`: a `DeviceMesh((1, n), ["batch", "model"])` of
the first `n` devices, a `LayoutMap` with the one rule
`layout_map["tokens/embeddings"] = ("model", None)` (the table by rows, and
nothing else on purpose: Keras's optimizer lays out its slots after their
variable, and this package every variable it derives from a table), and
`ModelParallel(layout_map=..., batch_dim_name="batch")`, set while the model
is built, trained and timed, unset after. The model is `Input((4,), int32)
-> Embedding(V, 32, name="tokens") -> GlobalAveragePooling1D -> Dense(1)`,
MSE, in two configurations (`CONFIGS`):
- "keras_dense_adam": `keras.layers.Embedding`, the model compiled with
  `Adam(1e-3)`: a dense gradient, and Adam's moments of the table's shape,
  created with the table's layout;
- "ours_row_sparse_adam": `keras_ext_embedding.Embedding(optimizer="adam")`,
  the model compiled with `SGD(1e-3)`: the layer steps the looked-up rows of
  the table and of its moments (`tokens/embeddings_momentum` and
  `_velocity`) itself; the model's SGD trains the Dense layer only.

Placement: the table-sized variables of the layer and of the model's
optimizer (every one of the table's shape); per device, the bytes of their
shards on it (`variable.value.addressable_shards`), once the optimizer is
built (before any step) and again after the timed steps; the most any
device holds, against the ideal (their total bytes over `n`). Time:
`model.fit` of a few batches compiles the step, then the median of
`train_on_batch` calls, each returning the loss as a Python float (the
step has finished).

The ids (`make_ids`) are Zipf-distributed ranks (exponent `ZIPF_EXPONENT`,
a few rows are hot, most are cold) scattered over the rows by a fixed
bijection, as hashed ids are: hot rows land on every device.
"""

import functools
import time

import keras
import numpy as np
from plan import SHARDED_BATCH_SHAPE, SHARDED_OUTPUT_DIM, SHARDED_TARGET
from timing import SEED, compare, release_memory

import keras_ext_embedding

CONFIGS = ("keras_dense_adam", "ours_row_sparse_adam")
TABLE = "tokens/embeddings"
LEARNING_RATE = 1e-3
ZIPF_EXPONENT = 1.2
# A prime that divides none of the vocabulary sizes: `rank * SCATTER % V`
# is a bijection of `[0, V)`.
SCATTER = 999_983
MESH_AXES = ("batch", "model")


def check_devices(counts):
    """Fails with how to start the process, where it has fewer devices
    than the largest count."""
    devices = keras.distribution.list_devices()
    if len(devices) < max(counts):
        raise SystemExit(
            f"The sharded section needs {max(counts)} devices; this process has "
            f"{len(devices)}. Start it with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={max(counts)} and "
            "KERAS_BACKEND=jax (run.py does)."
        )


def distribution(n):
    """`ModelParallel` on the first `n` devices, the table by rows."""
    devices = keras.distribution.list_devices()[:n]
    mesh = keras.distribution.DeviceMesh((1, n), list(MESH_AXES), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[TABLE] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def make_ids(input_dim, batches):
    """`batches` batches of `SHARDED_BATCH_SHAPE` int32 ids in `[0, V)`,
    stacked along the batch dimension."""
    rng = np.random.default_rng(SEED)
    shape = (batches * SHARDED_BATCH_SHAPE[0], *SHARDED_BATCH_SHAPE[1:])
    ranks = (rng.zipf(ZIPF_EXPONENT, size=shape) - 1) % input_dim
    return (ranks * SCATTER % input_dim).astype("int32")


def targets(batches):
    rng = np.random.default_rng(SEED + 1)
    return rng.normal(size=(batches * SHARDED_BATCH_SHAPE[0], 1)).astype("float32")


def build_model(config, input_dim):
    """`(model, layer)` of the configuration, compiled, its optimizer built."""
    if config == "keras_dense_adam":
        layer = keras.layers.Embedding(input_dim, SHARDED_OUTPUT_DIM, name="tokens")
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
    else:
        layer = keras_ext_embedding.Embedding(
            input_dim, SHARDED_OUTPUT_DIM, name="tokens", optimizer="adam"
        )
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
    inputs = keras.Input(SHARDED_BATCH_SHAPE[1:], dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(pooled))
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model, layer


def table_sized(model, layer):
    """The variables of the layer and of the model's optimizer of the
    table's shape, table first."""
    shape = tuple(layer.embeddings.shape)
    found = {}
    for variable in [*layer.variables, *model.optimizer.variables]:
        if tuple(variable.shape) == shape:
            found.setdefault(variable.path, variable)
    return list(found.values())


def spec(variable):
    """The variable's `PartitionSpec` as a string; the sharding's class name
    where it has none (one device: `SingleDeviceSharding`)."""
    sharding = variable.value.sharding
    return str(sharding.spec) if hasattr(sharding, "spec") else type(sharding).__name__


def device_bytes(variables, n):
    """The bytes of the variables' shards on each of the first `n` devices
    (in device order)."""
    devices = keras.distribution.list_devices()[:n]
    # `list_devices` names them "cpu:0"; a shard's device is a jax Device.
    totals = dict.fromkeys(devices, 0)
    for variable in variables:
        for shard in variable.value.addressable_shards:
            name = f"{shard.device.platform}:{shard.device.id}"
            totals[name] = totals.get(name, 0) + shard.data.nbytes
    return list(totals.values())


def placement(variables, n):
    per_device = device_bytes(variables, n)
    total = sum(variable.value.nbytes for variable in variables)
    return {
        "device_bytes": per_device,
        "max_device_bytes": max(per_device),
        "total_bytes": total,
        "ideal_device_bytes": total / n,
        "over_ideal": max(per_device) / (total / n),
    }


def train_step(model, ids, y):
    """One `train_on_batch`; its loss as a Python float (the step has
    finished)."""
    return float(np.asarray(model.train_on_batch(ids, y)))


def measure(plan, config, n, input_dim, data):
    """One configuration on `n` devices: the row of the report."""
    ids, y, fit_ids, fit_y = data
    keras.distribution.set_distribution(distribution(n))
    try:
        start = time.perf_counter()
        model, layer = build_model(config, input_dim)
        build_s = time.perf_counter() - start
        variables = table_sized(model, layer)
        built = placement(variables, n)
        built_specs = {v.path: spec(v) for v in variables}

        start = time.perf_counter()
        model.fit(
            fit_ids, fit_y, batch_size=SHARDED_BATCH_SHAPE[0], epochs=1, verbose=0
        )
        fit_s = time.perf_counter() - start

        step = functools.partial(train_step, model, ids, y)
        result = compare({"step": step}, plan["sharded_reps"], warmup=1)
        trained = placement(variables, n)
        row = {
            "config": config,
            "devices": n,
            "input_dim": input_dim,
            "output_dim": SHARDED_OUTPUT_DIM,
            "batch_shape": list(SHARDED_BATCH_SHAPE),
            "variables": [
                {
                    "path": v.path,
                    "shape": list(v.shape),
                    "bytes": v.value.nbytes,
                    "spec": built_specs[v.path],
                    "spec_after_training": spec(v),
                }
                for v in variables
            ],
            # After the timed steps: what training keeps on each device.
            **trained,
            "built": built,
            "target": f"<= {SHARDED_TARGET}x ideal",
            "met": max(trained["over_ideal"], built["over_ideal"]) <= SHARDED_TARGET,
            "step": result["step"],
            "build_s": build_s,
            "fit_s": fit_s,
            "loss": step(),
        }
    finally:
        keras.distribution.set_distribution(None)
    del model, layer, variables, step
    keras.backend.clear_session()
    release_memory()
    return row


def bench(plan, report):
    counts = plan["sharded_device_counts"]
    check_devices(counts)
    batches = plan["sharded_fit_batches"]
    for input_dim in plan["sharded_sizes"]:
        ids, y = make_ids(input_dim, 1), targets(1)
        data = (ids, y, make_ids(input_dim, batches), targets(batches))
        for config in CONFIGS:
            for n in counts:
                report(**measure(plan, config, n, input_dim, data))

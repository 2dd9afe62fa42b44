"""Every variable of a sharded layer, and what its training step moves (JAX).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        KERAS_BACKEND=jax python sharded_variables.py OUT.json DIR

For each case (a table format, LoRA, a `ReversibleEmbedding` tied or untied,
a bag, each with a row-sparse `optimizer=` or Keras's dense training), the
layer is built under `ModelParallel` on a (2, 4) mesh whose only rule is the
table's, `tokens/embeddings` rows over "model" (as keras-hub's
`get_layout_map` writes it): whatever else the layer creates must follow.
Writes, per case:

- `variables`: every variable of the layer, with its sharding spec, shape,
  bytes and the most bytes any one device holds of it;
- `init_traced`: whether the table's initializer ran inside a compiled
  program (sharded by its layout) rather than eagerly, whole;
- `fit`: the largest differences from the same training on one device
  (`model.fit`, same weights, same batches), and which variables trained;
- `collectives`: the collective operations of the compiled training step
  (a jitted stateless step, `jax.jit(...).lower(...).compile().as_text()`),
  with the element count of each;
- `invalid`: a row-sparse step on ids holding an invalid id, sharded and
  not: their largest difference, and whether rows no valid id names moved;
- `checkpoints`: the trained sharded model saved (`.weights.h5`) and loaded
  into the same mesh, a (4, 2) mesh and one device: the largest difference
  of the weights, and the layouts after loading.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import keras
import numpy as np

from keras_ext_embedding import Embedding, EmbeddingBag, ReversibleEmbedding

# A table shard (VOCAB * DIM / 4 values) is larger than anything a step
# should move: the batch's rows (BATCH * LENGTH * DIM) and an LM head's
# logits (BATCH * VOCAB).
VOCAB, DIM, LENGTH, BATCH, STEPS = 4096, 128, 4, 16, 3
MESH = (2, 4)
PER_ROW = keras.quantizers.Int4QuantizationConfig(block_size=-1)
GROUPED = keras.quantizers.Int4QuantizationConfig(block_size=32)
CASES = {
    "float_dense": {},
    "float_sgd": {"optimizer": "sgd"},
    "float_adagrad": {"optimizer": "adagrad"},
    "float_adam": {"optimizer": "adam"},
    "lora_adam": {"optimizer": "adam", "lora_rank": 4},
    "int8": {"quantize": ("int8", None)},
    "int8_lora_adam": {"quantize": ("int8", None), "lora_rank": 4, "optimizer": "adam"},
    "int4_per_row": {"quantize": ("int4", PER_ROW)},
    "int4_grouped": {"quantize": ("int4", GROUPED)},
    "tied": {"reversible": True},
    "tied_int8": {"reversible": True, "quantize": ("int8", None)},
    "untied": {"reversible": True, "tie_weights": False},
    "untied_adam": {"reversible": True, "tie_weights": False, "optimizer": "adam"},
    "untied_int8": {
        "reversible": True,
        "tie_weights": False,
        "quantize": ("int8", None),
    },
    "untied_int4_grouped": {
        "reversible": True,
        "tie_weights": False,
        "quantize": ("int4", GROUPED),
    },
    "bag_adam": {"bag": "mean", "optimizer": "adam"},
}
TRACED = []


class Recording(keras.initializers.RandomUniform):
    """Keras's default table initializer, noting whether it ran traced."""

    def __call__(self, shape, dtype=None):
        value = super().__call__(shape, dtype=dtype)
        TRACED.append(isinstance(value, jax.core.Tracer))
        return value


def mesh(shape):
    devices = keras.distribution.list_devices()
    return keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)


def model_parallel(shape=MESH):
    layout_map = keras.distribution.LayoutMap(mesh(shape))
    layout_map["tokens/embeddings"] = ("model", None)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def data(case, rng):
    ids = rng.integers(1, VOCAB, size=(STEPS * BATCH, LENGTH)).astype("int32")
    width = VOCAB if CASES[case].get("reversible") else 1
    targets = rng.normal(size=(STEPS * BATCH, width)).astype("float32")
    return ids, targets


def make_model(case, initial=None):
    """The case's model; its weights from `initial` (path -> array) or
    random, the same on every run."""
    kwargs = dict(CASES[case])
    mode, config = kwargs.pop("quantize", (None, None))
    lora_rank = kwargs.pop("lora_rank", None)
    combiner = kwargs.pop("bag", None)
    reversible = kwargs.pop("reversible", False)
    kwargs["embeddings_initializer"] = Recording(seed=3)
    inputs = keras.Input((LENGTH,), dtype="int32")
    if combiner is not None:
        layer = EmbeddingBag(VOCAB, DIM, combiner=combiner, name="tokens", **kwargs)
        outputs = keras.layers.Dense(1, name="head")(layer(inputs))
    elif reversible:
        layer = ReversibleEmbedding(VOCAB, DIM, name="tokens", **kwargs)
        x = keras.layers.Dense(DIM, name="hidden")(layer(inputs))
        outputs = layer(x[:, -1], reverse=True)
    else:
        layer = Embedding(VOCAB, DIM, name="tokens", **kwargs)
        x = keras.layers.GlobalAveragePooling1D()(layer(inputs))
        outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for variable in model.weights:
        if "iteration" in variable.name or variable.name.endswith(
            ("_momentum", "_velocity", "_accumulator")
        ):
            continue
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))
    if mode:
        layer.quantize(mode, config=config)
    if lora_rank:
        layer.enable_lora(lora_rank)
        layer.lora_embeddings_a.assign(
            rng.normal(size=(VOCAB, lora_rank)).astype("float32")
        )
        layer.lora_embeddings_b.assign(
            rng.normal(scale=0.1, size=(lora_rank, DIM)).astype("float32")
        )
    if initial is not None:
        for variable in model.weights:
            variable.assign(initial[variable.path])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def spec(variable):
    """The sharding spec, trailing None dropped (P('model') == P('model', None))."""
    axes = list(getattr(variable.value.sharding, "spec", ()))
    while axes and axes[-1] is None:
        axes.pop()
    return str(tuple(axes))


def per_device_bytes(variable):
    held = {}
    for shard in variable.value.addressable_shards:
        held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def describe(layer):
    return {
        v.path: {
            "spec": spec(v),
            "shape": list(v.shape),
            "bytes": int(np.prod(v.shape, dtype="int64")) * v.value.dtype.itemsize,
            "per_device_bytes": per_device_bytes(v),
            "trainable": v.trainable,
        }
        for v in layer.weights
    }


def arrays(model):
    return {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights}


def max_diff(a, b):
    return max(
        float(np.abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a
    )


def stateless_step(model):
    """A jitted training step of the whole model, as Keras's trainer runs it."""
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)

    def step(state, x, y):
        trainable, non_trainable, optimizer_variables = state

        def loss_of(trainable):
            y_pred, non_trainable_after = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return keras.ops.mean((y_pred - y) ** 2), non_trainable_after

        (_, non_trainable), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )
        return trainable, non_trainable, optimizer_variables

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    return jax.jit(step), state


def collectives(model, ids, targets):
    step, state = stateless_step(model)
    text = step.lower(state, ids, targets).compile().as_text()
    found = []
    for line in text.splitlines():
        for op in (
            "all-gather",
            "all-reduce",
            "reduce-scatter",
            "all-to-all",
            "collective-permute",
        ):
            if f" {op}(" in line or f" {op}-start(" in line:
                result = line.split("=", 1)[1].split(op, 1)[0]
                sizes = [
                    int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                    for dims in _shapes(result)
                ]
                found.append(
                    {"op": op, "shape": result.strip(), "elements": max(sizes)}
                )
    return found


def _shapes(text):
    out, rest = [], text
    while "[" in rest:
        start = rest.index("[")
        stop = rest.index("]", start)
        out.append(rest[start + 1 : stop])
        rest = rest[stop + 1 :]
    return out


def invalid_step(case, distribution, initial, ids, targets):
    """One jitted step on ids holding an invalid id: the table after it."""
    keras.distribution.set_distribution(distribution)
    try:
        model = make_model(case, initial)
        step, state = stateless_step(model)
        trainable, _, _ = step(state, ids, targets)
        names = [v.path for v in model.trainable_variables]
        return np.asarray(trainable[names.index("tokens/embeddings")])
    finally:
        keras.distribution.set_distribution(None)


def run_case(case, directory):
    rng = np.random.default_rng(0)
    ids, targets = data(case, rng)
    result = {}

    # One device: the reference weights and training.
    single = make_model(case)
    initial = arrays(single)
    single.fit(ids, targets, batch_size=BATCH, shuffle=False, verbose=0)
    single_after = arrays(single)

    keras.distribution.set_distribution(model_parallel())
    try:
        TRACED.clear()
        model = make_model(case, initial)
        result["init_traced"] = list(TRACED)
        layer = model.get_layer("tokens")
        result["variables"] = describe(layer)
        result["collectives"] = collectives(model, ids[:BATCH], targets[:BATCH])
        model.fit(ids, targets, batch_size=BATCH, shuffle=False, verbose=0)
        sharded_after = arrays(model)
        result["fit"] = {
            "weights_max_diff": max_diff(sharded_after, single_after),
            "trained": sorted(
                k for k in initial if not np.array_equal(initial[k], sharded_after[k])
            ),
            "single_trained": sorted(
                k for k in initial if not np.array_equal(initial[k], single_after[k])
            ),
            "variables_after": describe(layer),
        }
        path = os.path.join(directory, f"{case}.weights.h5")
        model.save_weights(path)
    finally:
        keras.distribution.set_distribution(None)

    checkpoints = {}
    for name, distribution in (
        ("same_mesh", model_parallel()),
        ("other_mesh", model_parallel((4, 2))),
        ("single", None),
    ):
        keras.distribution.set_distribution(distribution)
        try:
            loaded = make_model(case)
            loaded.load_weights(path)
            variables = describe(loaded.get_layer("tokens"))
            checkpoints[name] = {
                "weights_max_diff": max_diff(arrays(loaded), sharded_after),
                "specs": {k: v["spec"] for k, v in variables.items()},
            }
        finally:
            keras.distribution.set_distribution(None)
    result["checkpoints"] = checkpoints

    if CASES[case].get("optimizer") and not CASES[case].get("lora_rank"):
        bad = ids[:BATCH].copy()
        bad[0, 0] = VOCAB + 5
        bad[1, 1] = -1
        before = initial["tokens/embeddings"]
        one = invalid_step(case, None, initial, bad, targets[:BATCH])
        sharded = invalid_step(case, model_parallel(), initial, bad, targets[:BATCH])
        valid = np.unique(bad[(bad >= 0) & (bad < VOCAB)])
        others = np.setdiff1d(np.arange(VOCAB), valid)
        result["invalid"] = {
            "max_diff": float(np.abs(one - sharded).max()),
            "other_rows_moved": bool(np.any(sharded[others] != before[others])),
            "valid_rows_moved": bool(np.any(sharded[valid] != before[valid])),
        }
    return result


def main(out, directory):
    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    report = {"devices": len(devices), "vocab": VOCAB, "dim": DIM, "mesh": MESH}
    for case in CASES:
        report[case] = run_case(case, directory)
        print(case, "done", flush=True)
    with open(out, "w") as file:
        json.dump(report, file, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

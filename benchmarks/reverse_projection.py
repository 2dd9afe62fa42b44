"""The reverse projection of a ReversibleEmbedding (its logits), ours
against Keras's and against the backend's own matmul.

`layer(h, reverse=True)` projects hidden states onto the whole vocabulary:
every call reads the whole table once. The floor is the backend's one pass
over the float table's bytes: the table-first matmul `transpose(matmul(W,
transpose(h)))` on a tensor of its own, the fastest public form of `h @ W^T`
(`einsum("...d,vd->...v", h, W)` took 1.0-4.2x its time eagerly, most on
an AVX2 AMD EPYC; `matmul(h, transpose(W))` copies the table). Keras's layer
transposes the float table on every eager
call, adds the LoRA delta to a new `input_dim x output_dim` table, and
unpacks and dequantizes a whole int4 table; ours multiplies the table
first (`(W @ h^T)^T`), projects LoRA as `h @ W^T + s * (h @ B^T) @ A^T`,
and reads quantized tables in vocabulary chunks.

Both layers (`keras_ext_embedding.ReversibleEmbedding`, tied, and
`keras.layers.ReversibleEmbedding`) are built from the same float table and
quantized alike (`quantize(mode, config=...)`); their logits are checked to
agree (int8 bit for bit, the others within float32 rounding) in every mode
before anything is timed. This module also measures the peak memory of one
reverse call (as peak_memory.py does for lookups).
"""

import keras
import numpy as np
from keras import ops
from layers import quantization_config, variable_bytes
from peak_memory import (
    current_rss_mb,
    peak_rss_mb,
    reset_peak_rss,
    wait_for_rss_to_settle,
)
from plan import LORA_RANK, REVERSE_HIDDEN_SHAPES, REVERSE_OUTPUT_DIM
from timing import BACKEND, SEED, block, compare, release_memory

import keras_ext_embedding

# name: (quantization mode, Int4QuantizationConfig block_size, LoRA).
FORMATS = {
    "float32": (None, None, False),
    "float32_lora": (None, None, True),
    "int8": ("int8", None, False),
    "int4": ("int4", None, False),
    "int4_128": ("int4", 128, False),
}
# The dtype policy a peak-memory layer is built in (see peak_memory.py: a
# layer quantized from a float table would leave the freed table to serve
# the call's temporaries unseen); `block_size=-1` is one scale per row.
MEMORY_POLICIES = {
    "float32": None,
    "float32_lora": None,
    "int8": "int8_from_float32",
    "int4": "int4/-1_from_float32",
    "int4_128": "int4/128_from_float32",
}
LAYER_CLASSES = {
    "ours": keras_ext_embedding.ReversibleEmbedding,
    "keras": keras.layers.ReversibleEmbedding,
}
# Every (format, implementation) the peak-memory measurement covers.
MEMORY_MEASUREMENTS = [(name, impl) for name in FORMATS for impl in LAYER_CLASSES]
CALLABLES = ("ours", "keras", "floor")
# Within float32 rounding: logits are about 1 in magnitude, and the two
# layers sum the same 512 products in different orders.
RTOL, ATOL = 1e-5, 2e-5
# Peak-memory target: no reverse call of ours adds more than this fraction
# of the float32 table's bytes.
MEMORY_FRACTION = 0.25


def float_table(input_dim):
    """The float32 table both layers and the floor hold, as NumPy: Keras's
    default `uniform` initializer's range, seeded."""
    rng = np.random.default_rng(SEED)
    shape = (input_dim, REVERSE_OUTPUT_DIM)
    return rng.uniform(-0.05, 0.05, size=shape).astype("float32")


def hidden_states(shape):
    rng = np.random.default_rng(SEED + 1)
    return ops.convert_to_tensor(rng.normal(size=shape).astype("float32"))


def nonzero_lora_b():
    """A small non-zero LoRA `B` of `output_dim=512` (it starts at zero)."""
    rng = np.random.default_rng(SEED + 2)
    return rng.normal(size=(LORA_RANK, REVERSE_OUTPUT_DIM)).astype("float32") * 0.01


def reversible_pair(table, name):
    """Ours and Keras's tied ReversibleEmbedding holding `table` (NumPy), in
    format `name`, built and quantized alike."""
    mode, block_size, lora = FORMATS[name]
    input_dim = table.shape[0]
    layers = [cls(input_dim, REVERSE_OUTPUT_DIM) for cls in LAYER_CLASSES.values()]
    for layer in layers:
        layer.build()
        layer.embeddings.assign(table)
        if lora:
            layer.enable_lora(LORA_RANK)
        if mode:
            layer.quantize(mode, config=quantization_config(mode, block_size))
    ours, theirs = layers
    if lora:
        b = nonzero_lora_b()
        a = ops.convert_to_numpy(ours.lora_embeddings_a)
        for layer in layers:
            layer.lora_embeddings_a.assign(a)
            layer.lora_embeddings_b.assign(b)
    ours_names = [v.name for v in ours.weights]
    keras_names = [v.name for v in theirs.weights]
    if ours_names != keras_names:
        raise AssertionError(f"{name}: ours holds {ours_names}, Keras {keras_names}")
    return ours, theirs


def reverse_calls(layer):
    """`{mode: callable(h)}` of the layer's reverse call: eager, then
    compiled as `layers.compiled_forwards` compiles a lookup (XLA only on
    TensorFlow; none on PyTorch, where Keras does not compile by default)."""

    def reverse(h):
        return layer(h, reverse=True)

    calls = {"eager": reverse}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        calls["tf.function XLA"] = tf.function(reverse, jit_compile=True)
    elif BACKEND == "jax":
        import jax

        @jax.jit
        def project(trainable, non_trainable, h):
            return layer.stateless_call(trainable, non_trainable, h, reverse=True)[0]

        def call(h):
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            return project(trainable, non_trainable, h)

        calls["jax.jit"] = call
    return calls


def floor_calls(table):
    """`{mode: callable(h)}` of the floor: `transpose(matmul(W,
    transpose(h)))` of `(..., 512)` hidden states flattened to rows, on a
    tensor of its own holding the float table, in the modes of
    `reverse_calls` (under `jax.jit` the table is an argument, as the
    layers' variables are)."""
    weights = ops.convert_to_tensor(table)

    def matmul(h, weights=weights):
        rows = ops.reshape(h, (-1, h.shape[-1]))
        logits = ops.transpose(ops.matmul(weights, ops.transpose(rows)))
        return ops.reshape(logits, (*h.shape[:-1], weights.shape[0]))

    calls = {"eager": matmul}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        calls["tf.function XLA"] = tf.function(matmul, jit_compile=True)
    elif BACKEND == "jax":
        import jax

        compiled = jax.jit(lambda weights, h: matmul(h, weights))
        calls["jax.jit"] = lambda h: compiled(weights, h)
    return calls


def check_logits(name, mode, ours, theirs, floor, h):
    """Guards the timings: Keras's logits and ours agree (int8 bit for bit),
    and for the float table the floor's too."""
    mine = ops.convert_to_numpy(ours(h))
    other = ops.convert_to_numpy(theirs(h))
    where = f"{name} {mode}, hidden {tuple(h.shape)}"
    if name == "int8":
        np.testing.assert_array_equal(mine, other, err_msg=where)
    else:
        np.testing.assert_allclose(mine, other, RTOL, ATOL, err_msg=where)
    if name == "float32":
        reference = ops.convert_to_numpy(floor(h))
        np.testing.assert_allclose(mine, reference, RTOL, ATOL, err_msg=where)


def target(name, hidden, mode, row):
    """`(target, met)` of a row. The targets are for one decoding step,
    eagerly: float within 1.3x of the floor, LoRA >= 5x and int4 in groups
    of 128 >= 3x faster than Keras, int8 at most 1.2x Keras's time."""
    if hidden != "decode" or mode != "eager":
        return "none (for information)", None
    if name == "float32":
        return "ours/floor <= 1.30", row["ours_over_floor"] <= 1.30
    if name == "float32_lora":
        return "speedup >= 5x", 1 / row["ratio"] >= 5
    if name == "int4_128":
        return "speedup >= 3x", 1 / row["ratio"] >= 3
    if name == "int8":
        return "ratio <= 1.20", row["ratio"] <= 1.20
    return "none (for information)", None


def gb_per_s(table_bytes, summary):
    return table_bytes / (summary["median_ms"] / 1000) / 1e9


def measure_format(plan, table, name, floors, report):
    input_dim = table.shape[0]
    ours, theirs = reversible_pair(table, name)
    table_bytes = variable_bytes(ours)
    float_bytes = table.nbytes
    ours_calls, keras_calls = reverse_calls(ours), reverse_calls(theirs)
    for hidden, shape in REVERSE_HIDDEN_SHAPES.items():
        reps = plan["reverse_reps"][hidden].get(input_dim)
        if reps is None:
            continue
        h = hidden_states(shape)
        settle = hidden == "decode" and input_dim >= plan["reverse_settle_from"]
        for mode, mine in ours_calls.items():
            by_name = {"ours": mine, "keras": keras_calls[mode], "floor": floors[mode]}
            check_logits(name, mode, *by_name.values(), h)
            calls = {key: lambda f=f, h=h: f(h) for key, f in by_name.items()}
            result = compare(calls, reps, plan["reverse_warmup"], settle=settle)
            floor_ms = result["floor"]["median_ms"]
            row = {
                "format": name,
                "input_dim": input_dim,
                "output_dim": REVERSE_OUTPUT_DIM,
                "hidden": hidden,
                "hidden_shape": list(shape),
                "mode": mode,
                **result,
                "ratio": result["ours"]["median_ms"] / result["keras"]["median_ms"],
                "ours_over_floor": result["ours"]["median_ms"] / floor_ms,
                "keras_over_floor": result["keras"]["median_ms"] / floor_ms,
                # Each call reads the layer's whole table (the floor: the
                # float32 table) once.
                "table_bytes": table_bytes,
                "float32_bytes": float_bytes,
                "ours_gb_s": gb_per_s(table_bytes, result["ours"]),
                "keras_gb_s": gb_per_s(table_bytes, result["keras"]),
                "floor_gb_s": gb_per_s(float_bytes, result["floor"]),
            }
            row["target"], row["met"] = target(name, hidden, mode, row)
            report(**row)
    del ours, theirs, ours_calls, keras_calls
    release_memory()


def bench(plan, report):
    """Every format at every size: ours, Keras's and the floor, eager and
    compiled, on decode and prefill hidden states."""
    for input_dim in plan["reverse_sizes"]:
        table = float_table(input_dim)
        floors = floor_calls(table)
        for name in FORMATS:
            measure_format(plan, table, name, floors, report)
        del table, floors
        release_memory()


def memory_layer(impl, name, input_dim):
    """A tied layer in format `name`, built directly in its dtype policy
    (with the int4 config the timings quantize with): its values are the
    initializers', which does not change what a call allocates."""
    mode, block_size, lora = FORMATS[name]
    layer = LAYER_CLASSES[impl](
        input_dim,
        REVERSE_OUTPUT_DIM,
        dtype=MEMORY_POLICIES[name],
        quantization_config=quantization_config(mode, block_size) if mode else None,
    )
    layer.build()
    if lora:
        layer.enable_lora(LORA_RANK)
        layer.lora_embeddings_b.assign(nonzero_lora_b())
    return layer


def measure_memory(impl, name, input_dim, settle_polls):
    """One entry: the layer's variable bytes and the peak RSS increase of one
    reverse call on decode hidden states, after a call of a small layer of
    the same format (first-call setup) and with the process settled (see
    peak_memory.measure)."""
    h = hidden_states(REVERSE_HIDDEN_SHAPES["decode"])
    block(memory_layer(impl, name, 1000)(h, reverse=True))
    layer = memory_layer(impl, name, input_dim)
    block([variable.value for variable in layer.weights])
    release_memory()
    wait_for_rss_to_settle(*settle_polls)
    was_reset = reset_peak_rss()
    before_rss, before_peak = current_rss_mb(), peak_rss_mb()
    logits = block(layer(h, reverse=True))
    after_peak = peak_rss_mb()
    float_mb = input_dim * REVERSE_OUTPUT_DIM * 4 / 2**20
    increase = after_peak - before_peak
    entry = {
        "impl": impl,
        "format": name,
        "input_dim": input_dim,
        "output_dim": REVERSE_OUTPUT_DIM,
        "hidden_shape": list(ops.shape(h)),
        "table_bytes": variable_bytes(layer),
        "float32_mb": float_mb,
        "logits_mb": float(np.prod(ops.shape(logits)))
        * np.dtype(keras.backend.standardize_dtype(logits.dtype)).itemsize
        / 2**20,
        "rss_before_mb": before_rss,
        "peak_before_mb": before_peak,
        "peak_after_mb": after_peak,
        "peak_increase_mb": increase,
        "peak_was_reset": was_reset,
        "limit_mb": float_mb * MEMORY_FRACTION,
        # The target is ours; Keras's rows are for comparison.
        "met": increase <= float_mb * MEMORY_FRACTION if impl == "ours" else None,
    }
    del layer, logits
    release_memory()
    return entry

"""Plain lookups: ours and Keras's against the backend's own gather op.

The backend's op on the same table (`tf.gather`, `jnp.take`,
`torch.nn.functional.embedding`) is the floor no Keras layer can beat; the
ratios to it show what the layers' bookkeeping costs. The `lookup` case of
the speed table (ours against Keras, `invalid_ids` "raise" and "zeros")
comes from the same measurements, at `plan["lookup_size"]` rows.
"""

import numpy as np
from keras import ops
from layers import build_pair, check_same, forwards
from plan import AS_FAST_AS_KERAS, OUTPUT_DIM
from timing import BACKEND, compare, make_ids, release_memory, timed

import keras_ext_embedding

# Ratios are of medians; "ours" is the default configuration.
CALLABLES = ("ours", "ours_zeros", "keras", "native")


def native_forwards(values, torch_compile):
    """`{mode: callable(ids)}` of the backend's gather on a table of its own
    holding `values` (NumPy), eager and compiled as `layers.forwards`
    compiles the layers.

    Not the layers' own variable: on TensorFlow a sparse read of a variable
    (`tf.gather` on it is a `ResourceGather`) switches the variable to
    copy-on-read, and from then on every dense read copies the whole table,
    as Keras's `ops.take` does (it converts the variable to a tensor first).
    A lookup of either layer then costs a table copy: 12x slower at 100,000
    rows. An optimizer's sparse update does the same, see docs/benchmarks.md.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        table = tf.Variable(values)

        def gather(ids):
            return tf.gather(table, ids)

        return {
            "eager": gather,
            "tf.function": tf.function(gather, jit_compile=False),
            "tf.function XLA": tf.function(gather, jit_compile=True),
        }
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        table = jnp.asarray(values)

        def take(values, ids):
            return jnp.take(values, ids, axis=0)

        # The table is an argument, as the layers' variables are under jit.
        compiled = jax.jit(take)
        return {
            "eager": lambda ids: take(table, ids),
            "jax.jit": lambda ids: compiled(table, ids),
        }
    import torch

    table = torch.as_tensor(values)

    def embedding(ids):
        return torch.nn.functional.embedding(ids, table)

    if not torch_compile:
        return {"eager": embedding}
    return {"eager": embedding, "torch.compile": torch.compile(embedding)}


def zeros_twin(ours):
    """Ours with `invalid_ids="zeros"`, holding the same table."""
    layer = keras_ext_embedding.Embedding(
        ours.input_dim, OUTPUT_DIM, invalid_ids="zeros"
    )
    layer.build()
    layer.embeddings.assign(ops.convert_to_numpy(ours.embeddings))
    return layer


def check_native(native, ours, ids):
    np.testing.assert_array_equal(
        ops.convert_to_numpy(native(ids)), ops.convert_to_numpy(ours(ids))
    )


def first_calls(callables):
    """Seconds of each first call: torch.compile compiles then, for seconds."""
    return {name: timed(function) for name, function in callables.items()}


def measure_size(plan, input_dim, report):
    ids = ops.convert_to_tensor(make_ids(input_dim))
    ours, theirs = build_pair(input_dim)
    zeros = zeros_twin(ours)
    check_same(ours, theirs, ids)
    check_same(zeros, theirs, ids)
    torch_compile = input_dim in plan["torch_compile_sizes"]
    layer_modes = {
        "ours": forwards(ours, torch_compile),
        "ours_zeros": forwards(zeros, torch_compile),
        "keras": forwards(theirs, torch_compile),
        "native": native_forwards(ops.convert_to_numpy(ours.embeddings), torch_compile),
    }
    for mode in layer_modes["native"]:
        by_name = {name: layer_modes[name][mode] for name in CALLABLES}
        calls = {name: lambda f=f: f(ids) for name, f in by_name.items()}
        check_native(by_name["native"], ours, ids)
        compiling = mode == "torch.compile"
        first = first_calls(calls) if compiling else None
        if compiling:
            reps = plan["torch_compile_reps"]
        else:
            reps = plan["native_reps"][input_dim]
        result = compare(calls, reps, warmup=plan["native_warmup"])
        native_ms = result["native"]["median_ms"]
        report(
            input_dim=input_dim,
            mode=mode,
            **result,
            ours_over_native=result["ours"]["median_ms"] / native_ms,
            ours_zeros_over_native=result["ours_zeros"]["median_ms"] / native_ms,
            keras_over_native=result["keras"]["median_ms"] / native_ms,
            first_call_s=first,
        )
    del ours, theirs, zeros, layer_modes
    release_memory()


def lookup_rows(plan, floor_rows):
    """The speed table's `lookup` rows: ours ("raise" and "zeros") against
    Keras at `plan["lookup_size"]` rows, from the native-floor measurements."""
    for row in floor_rows:
        if row["input_dim"] != plan["lookup_size"]:
            continue
        for variant, name in (("raise", "ours"), ("zeros", "ours_zeros")):
            ratio = row[name]["median_ms"] / row["keras"]["median_ms"]
            yield {
                "case": "lookup",
                "mode": row["mode"],
                "variant": variant,
                "input_dim": row["input_dim"],
                "target": f"ratio <= {AS_FAST_AS_KERAS}",
                "met": ratio <= AS_FAST_AS_KERAS,
                "ours": row[name],
                "keras": row["keras"],
                "ratio": ratio,
                "ours_first_call_s": (row["first_call_s"] or {}).get(name),
            }


def bench(plan, report):
    for input_dim in plan["native_sizes"]:
        measure_size(plan, input_dim, report)

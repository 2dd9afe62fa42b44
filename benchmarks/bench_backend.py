"""Times keras_ext_embedding.Embedding against keras.layers.Embedding, one backend.

Run by `benchmarks/run.py`, once per backend, with `KERAS_BACKEND` set in the
environment (Keras reads it at its first import). Both layers run in this same
process on the same ids and the same weights; each repetition times ours and
Keras's back to back, in alternating order, so that load from other processes
hits both alike. Prints one JSON object on stdout.

    KERAS_BACKEND=jax python benchmarks/bench_backend.py --quick
    KERAS_BACKEND=torch python benchmarks/bench_backend.py --memory ours

`--memory IMPL` measures instead the peak resident memory that one forward
pass adds, for one implementation (`ours` or `keras`) and one `--memory-case`
(`lora`, `int4`, `int4_lora`), in a process of its own: a peak, once reached,
hides every smaller one after it.
"""

import argparse
import gc
import json
import os
import re
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import keras_ext_embedding

BACKEND = keras.config.backend()
BATCH_SHAPE = (64, 32)
OUTPUT_DIM = 128
LORA_RANK = 8
SEED = 0


def make_ids(input_dim):
    rng = np.random.default_rng(SEED)
    return rng.integers(0, input_dim, size=BATCH_SHAPE).astype("int32")


def block(outputs):
    """Waits until `outputs` are computed.

    JAX dispatches asynchronously; TensorFlow (eager and tf.function) and
    PyTorch on CPU return finished tensors, so there is nothing to wait for.
    """
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(outputs)
    return outputs


def summarize(seconds):
    milliseconds = [s * 1000 for s in seconds]
    q1, _, q3 = statistics.quantiles(milliseconds, n=4)
    return {
        "median_ms": statistics.median(milliseconds),
        "iqr_ms": q3 - q1,
        "reps": len(milliseconds),
    }


def timed(function):
    start = time.perf_counter()
    block(function())
    return time.perf_counter() - start


def compare(ours, theirs, reps, warmup, settle=False):
    """Times two zero-argument callables, alternating which runs first.

    With `settle`, each timed call follows an untimed call of the same
    callable. A Keras LoRA call at 1M rows leaves work running after it
    returns (freeing gigabytes of temporaries): timed right after it, our
    JAX training step measured 5x its steady-state time. The settle call
    absorbs the other layer's leftovers; the timed call still pays its own
    previous call's, as a training loop does.
    """
    for _ in range(warmup):
        block(ours())
        block(theirs())
    times = {"ours": [], "keras": []}
    for rep in range(reps):
        pairs = [("ours", ours), ("keras", theirs)]
        if rep % 2:
            pairs.reverse()
        for name, function in pairs:
            if settle:
                block(function())
            times[name].append(timed(function))
    ours_summary = summarize(times["ours"])
    keras_summary = summarize(times["keras"])
    return {
        "ours": ours_summary,
        "keras": keras_summary,
        "ratio": ours_summary["median_ms"] / keras_summary["median_ms"],
    }


def build_pair(input_dim, lora_rank=None, **ours_kwargs):
    """Ours and Keras's layer, built, holding the same weights."""
    ours = keras_ext_embedding.Embedding(
        input_dim, OUTPUT_DIM, lora_rank=lora_rank, **ours_kwargs
    )
    theirs = keras.layers.Embedding(input_dim, OUTPUT_DIM, lora_rank=lora_rank)
    ours.build()
    theirs.build()
    if lora_rank:
        # B starts at zero; a non-zero B makes the delta real work to add.
        rng = np.random.default_rng(SEED)
        b = rng.normal(size=(lora_rank, OUTPUT_DIM)).astype("float32") * 0.01
        ours.lora_embeddings_b.assign(b)
    # Copies through NumPy: on JAX, assigning the variable itself would share
    # one buffer between both layers, which a donating train step deletes.
    for ours_variable, keras_variable in zip(ours.weights, theirs.weights, strict=True):
        keras_variable.assign(ops.convert_to_numpy(ours_variable))
    return ours, theirs


def check_same(ours, theirs, ids):
    """Guards the timings: both layers must compute the same rows."""
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours(ids)),
        ops.convert_to_numpy(theirs(ids)),
        rtol=1e-5,
        atol=1e-6,
    )


def compiled_forwards(layer):
    """`{mode: callable(ids)}` of the compiled forward passes of a layer."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return {
            "tf.function": tf.function(layer.__call__, jit_compile=False),
            "tf.function XLA": tf.function(layer.__call__, jit_compile=True),
        }
    if BACKEND == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, ids):
            return layer.stateless_call(trainable, non_trainable, ids)[0]

        def call(ids):
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            return forward(trainable, non_trainable, ids)

        return {"jax.jit": call}
    return {}


def compare_forwards(ours, theirs, ids, reps, warmup, settle):
    """Times ours against Keras's on `ids`, eagerly and in each compiled mode
    of the backend; yields `(mode, result of compare)`."""
    pairs = {"eager": (ours.__call__, theirs.__call__)}
    theirs_compiled = compiled_forwards(theirs)
    for mode, forward in compiled_forwards(ours).items():
        pairs[mode] = (forward, theirs_compiled[mode])
    for mode, (mine, other) in pairs.items():
        result = compare(
            lambda mine=mine: mine(ids),
            lambda other=other: other(ids),
            reps,
            warmup,
            settle=settle,
        )
        yield mode, result


def bench_lookup(args, report):
    input_dim = 10_000 if args.quick else 100_000
    reps = 30 if args.quick else 300
    ids = ops.convert_to_tensor(make_ids(input_dim))
    ours, theirs = build_pair(input_dim)
    zeros = keras_ext_embedding.Embedding(input_dim, OUTPUT_DIM, invalid_ids="zeros")
    zeros.build()
    zeros.embeddings.assign(ops.convert_to_numpy(ours.embeddings))
    check_same(ours, theirs, ids)
    check_same(zeros, theirs, ids)
    variants = {"raise": ours, "zeros": zeros}
    modes = {"eager": {v: layer.__call__ for v, layer in variants.items()}}
    modes["eager"]["keras"] = theirs.__call__
    for layer_name, layer in [*variants.items(), ("keras", theirs)]:
        for mode, forward in compiled_forwards(layer).items():
            modes.setdefault(mode, {})[layer_name] = forward
    for mode, forwards in modes.items():
        other = forwards["keras"]
        for variant in variants:
            mine = forwards[variant]
            result = compare(
                lambda mine=mine: mine(ids), lambda other=other: other(ids), reps, 5
            )
            report(
                case="lookup",
                mode=mode,
                variant=variant,
                input_dim=input_dim,
                target="ratio <= 1.10",
                met=result["ratio"] <= 1.10,
                **result,
            )
    if BACKEND == "torch" and not args.skip_torch_compile:
        bench_torch_compile(args, report, ids, variants, theirs)


def bench_torch_compile(args, report, ids, variants, theirs):
    """torch.compile rows, for information: no target.

    On CPU each first call compiles for seconds, and the guards and graph
    breaks in Keras's `Layer.__call__` make the compiled call slower than
    eager for both layers; Keras does not compile on PyTorch by default.
    """
    import torch

    other = torch.compile(theirs.__call__)
    for variant, layer in variants.items():
        forward = torch.compile(layer.__call__)
        first = timed(lambda forward=forward: forward(ids))
        result = compare(
            lambda forward=forward: forward(ids),
            lambda: other(ids),
            5 if args.quick else 30,
            2,
        )
        report(
            case="lookup",
            mode="torch.compile",
            variant=variant,
            input_dim=theirs.input_dim,
            target="none (for information)",
            met=None,
            ours_first_call_s=first,
            **result,
        )


def bench_lora_forward(args, report, ids, ours, theirs):
    reps = 3 if args.quick else 15
    check_same(ours, theirs, ids)
    for mode, result in compare_forwards(ours, theirs, ids, reps, 1, settle=True):
        report(
            case="lora_forward",
            mode=mode,
            variant="raise",
            input_dim=ours.input_dim,
            target="speedup >= 50x at 1M rows",
            met=None if args.quick else 1 / result["ratio"] >= 50,
            **result,
        )


QUANTIZED_INPUT_DIM = 1_000_000
# (label, mode, Int4QuantizationConfig block_size): Keras's int8, its int4
# with one scale per row, and its default int4 (groups of 128).
QUANTIZED_CONFIGS = [
    ("int8", "int8", None),
    ("int4 per row", "int4", None),
    ("int4 block 128", "int4", 128),
]


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
        rng = np.random.default_rng(SEED)
        b = rng.normal(size=(lora_rank, OUTPUT_DIM)).astype("float32") * 0.01
        for layer in (ours, theirs):
            layer.lora_embeddings_b.assign(b)
            layer.lora_embeddings_a.assign(ops.convert_to_numpy(ours.lora_embeddings_a))
    return ours, theirs


def variable_bytes(layer):
    return sum(
        int(np.prod(v.shape))
        * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in layer.weights
    )


def bench_quantized_lookup(args, report, table_report):
    """int8 and int4 lookups against Keras's, and the bytes of each table."""
    input_dim = 100_000 if args.quick else QUANTIZED_INPUT_DIM
    reps = 5 if args.quick else 30
    ids = ops.convert_to_tensor(make_ids(input_dim))
    float_bytes = input_dim * OUTPUT_DIM * 4
    for label, mode, block_size in QUANTIZED_CONFIGS:
        ours, theirs = quantized_pair(input_dim, mode, block_size)
        check_same(ours, theirs, ids)
        table_report(
            config=label,
            input_dim=input_dim,
            ours_bytes=variable_bytes(ours),
            keras_bytes=variable_bytes(theirs),
            float32_bytes=float_bytes,
        )
        timings = compare_forwards(ours, theirs, ids, reps, 2, settle=mode == "int4")
        for call_mode, result in timings:
            if mode == "int8":
                target, met = "ratio <= 1.20", result["ratio"] <= 1.20
            else:
                target = "speedup >= 20x at 1M rows"
                met = None if args.quick else 1 / result["ratio"] >= 20
            report(
                case=f"{label} lookup",
                mode=call_mode,
                variant="raise",
                input_dim=input_dim,
                target=target,
                met=met,
                **result,
            )
        del ours, theirs
        gc.collect()


def bench_quantized_lora(args, report):
    """LoRA on our int8 and int4 tables against LoRA on Keras's int8 (and,
    for information, Keras's int4)."""
    input_dim = 100_000 if args.quick else QUANTIZED_INPUT_DIM
    reps = 5 if args.quick else 30
    ids = ops.convert_to_tensor(make_ids(input_dim))
    ours_int8, keras_int8 = quantized_pair(input_dim, "int8", None, LORA_RANK)
    check_same(ours_int8, keras_int8, ids)
    ours_int4, keras_int4 = quantized_pair(input_dim, "int4", 128, LORA_RANK)
    check_same(ours_int4, keras_int4, ids)
    cases = [
        ("int8 LoRA", ours_int8, keras_int8, "vs keras int8 LoRA"),
        ("int4 LoRA", ours_int4, keras_int8, "vs keras int8 LoRA"),
        ("int4 LoRA", ours_int4, keras_int4, "vs keras int4 LoRA"),
    ]
    for label, ours, theirs, against in cases:
        for call_mode, result in compare_forwards(
            ours, theirs, ids, reps, 2, settle=True
        ):
            if "int8" in against:
                target, met = "ratio <= 1.10", result["ratio"] <= 1.10
            else:
                target, met = "none (for information)", None
            report(
                case=f"{label} forward {against}",
                mode=call_mode,
                variant="raise",
                input_dim=input_dim,
                target=target,
                met=met,
                **result,
            )


def train_model(layer):
    inputs = keras.Input(BATCH_SHAPE[1:], dtype="int32")
    outputs = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def bench_lora_train(args, report, ids, ours, theirs):
    reps = 3 if args.quick else 15
    rng = np.random.default_rng(SEED)
    targets = rng.normal(size=(BATCH_SHAPE[0], OUTPUT_DIM)).astype("float32")
    ids = ops.convert_to_numpy(ids)
    ours_model = train_model(ours)
    theirs_model = train_model(theirs)
    # train_on_batch returns the loss as Python floats: the step has finished.
    result = compare(
        lambda: ours_model.train_on_batch(ids, targets),
        lambda: theirs_model.train_on_batch(ids, targets),
        reps,
        1,
        settle=True,
    )
    # Keras's default: XLA on JAX, tf.function without XLA on a TensorFlow
    # CPU, eager on PyTorch.
    mode = {
        "jax": "train_on_batch (jax.jit)",
        "tensorflow": "train_on_batch (tf.function)",
        "torch": "train_on_batch (eager)",
    }[BACKEND]
    report(
        case="lora_train",
        mode=mode,
        variant="raise",
        input_dim=ours.input_dim,
        target="speedup >= 10x at 1M rows",
        met=None if args.quick else 1 / result["ratio"] >= 10,
        **result,
    )


def bench(args):
    rows = []
    tables = []

    def report(**row):
        rows.append(row)
        # Progress for run.py to echo; the JSON result goes to stdout at the end.
        print(
            f"[bench] {BACKEND} {row['case']} {row['mode']} {row['variant']}: "
            f"ours {row['ours']['median_ms']:.3f} ms, "
            f"keras {row['keras']['median_ms']:.3f} ms, "
            f"ours/keras {row['ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    cases = args.cases.split(",")
    if "lookup" in cases:
        bench_lookup(args, report)
    if "quantized" in cases:
        bench_quantized_lookup(args, report, lambda **row: tables.append(row))
        bench_quantized_lora(args, report)
    if "lora_forward" in cases or "lora_train" in cases:
        input_dim = 100_000 if args.quick else 1_000_000
        ids = ops.convert_to_tensor(make_ids(input_dim))
        ours, theirs = build_pair(input_dim, lora_rank=LORA_RANK)
        if "lora_forward" in cases:
            bench_lora_forward(args, report, ids, ours, theirs)
        if "lora_train" in cases:
            bench_lora_train(args, report, ids, ours, theirs)
    return {
        "backend": BACKEND,
        "versions": versions(),
        "rows": rows,
        "table_bytes": tables,
    }


def versions():
    found = {"python": sys.version.split()[0], "keras": keras.__version__}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    elif BACKEND == "jax":
        import jax

        found["jax"] = jax.__version__
    else:
        import torch

        found["torch"] = torch.__version__
    return found


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


def wait_for_rss_to_settle(timeout=15.0, interval=0.25, steady_polls=4):
    """Waits until the resident set size stays put for a second.

    Backends build and free large buffers asynchronously: a second after
    `build()` returned, JAX was still computing the 1M-row initializer and
    then held 1.4 GB of its temporaries. A forward pass measured then would
    reuse that memory without raising the peak, hiding its own temporaries.
    """
    deadline = time.monotonic() + timeout
    previous = current_rss_mb()
    steady = 0
    while steady < steady_polls and time.monotonic() < deadline:
        time.sleep(interval)
        current = current_rss_mb()
        steady = steady + 1 if abs(current - previous) < 1 else 0
        previous = current


def reset_peak_rss():
    """Lowers the peak RSS to the current RSS (Linux >= 4.0); tells if it could.

    Building a 1M-row table can itself leave a high peak (initializer
    temporaries), which would hide the forward pass's own peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def memory(args):
    input_dim = 100_000 if args.quick else 1_000_000
    layer_class = {
        "ours": keras_ext_embedding.Embedding,
        "keras": keras.layers.Embedding,
    }[args.memory]

    def make(vocabulary):
        # An int4 layer is built quantized (Keras's default groups of 128),
        # never holding a float table: TensorFlow's allocator would keep the
        # freed float table and serve the forward pass's temporaries from it,
        # unseen by the resident set size.
        dtype = None if args.memory_case == "lora" else "int4/128_from_float32"
        layer = layer_class(vocabulary, OUTPUT_DIM, dtype=dtype)
        layer.build()
        if args.memory_case != "int4":
            layer.enable_lora(LORA_RANK)
            rng = np.random.default_rng(SEED)
            b = rng.normal(size=(LORA_RANK, OUTPUT_DIM)).astype("float32") * 0.01
            layer.lora_embeddings_b.assign(b)
        return layer

    ids_small = ops.convert_to_tensor(make_ids(1000))
    ids = ops.convert_to_tensor(make_ids(input_dim))
    # Imports and first-call kernel setup happen on a small layer, outside the
    # measured window.
    block(make(1000)(ids_small))
    layer = make(input_dim)
    block([variable.value for variable in layer.weights])
    gc.collect()
    wait_for_rss_to_settle()
    was_reset = reset_peak_rss()
    before_peak = peak_rss_mb()
    before_current = current_rss_mb()
    outputs = block(layer(ids))
    after_peak = peak_rss_mb()
    return {
        "backend": BACKEND,
        "impl": args.memory,
        "case": args.memory_case,
        "input_dim": input_dim,
        # The size of an input_dim x output_dim temporary: float32 for the
        # float LoRA table, int8 for an unpacked int4 table.
        "table_mb": input_dim
        * OUTPUT_DIM
        * (4 if args.memory_case == "lora" else 1)
        / 2**20,
        "output_mb": float(np.prod(ops.shape(outputs))) * 4 / 2**20,
        "rss_before_mb": before_current,
        "peak_before_mb": before_peak,
        "peak_after_mb": after_peak,
        "peak_increase_mb": after_peak - before_peak,
        "peak_was_reset": was_reset,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode")
    parser.add_argument(
        "--cases",
        default="lookup,lora_forward,lora_train,quantized",
        help="comma-separated: lookup, lora_forward, lora_train, quantized",
    )
    parser.add_argument("--memory", choices=("ours", "keras"))
    parser.add_argument(
        "--memory-case",
        choices=("lora", "int4", "int4_lora"),
        default="lora",
        help="the layer whose forward pass --memory measures",
    )
    parser.add_argument(
        "--skip-torch-compile",
        action="store_true",
        help="leave out the torch.compile rows (seconds of compiling each)",
    )
    args = parser.parse_args()
    keras.utils.set_random_seed(SEED)
    result = memory(args) if args.memory else bench(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Measures keras_ext_embedding.Embedding against keras.layers.Embedding, one backend.

Run by `benchmarks/run.py`, once per backend, with `KERAS_BACKEND` set in the
environment (Keras reads it at its first import). Every comparison runs in
this one process on the same ids and the same weights, rotating which
implementation goes first. Progress goes to stderr as `[bench] ...` lines;
the result is one JSON object on the last line of stdout.

    KERAS_BACKEND=jax python benchmarks/bench_backend.py --quick
    KERAS_BACKEND=jax python benchmarks/bench_backend.py --sections vocab_scaling
    KERAS_BACKEND=torch python benchmarks/bench_backend.py --quick --sections training
    KERAS_BACKEND=torch python benchmarks/bench_backend.py --memory int4:ours
    KERAS_BACKEND=jax python benchmarks/bench_backend.py --reverse-memory int8:keras
    KERAS_BACKEND=torch python benchmarks/bench_backend.py --bags-memory int4,native
    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python benchmarks/bench_backend.py --sections sharded

`--memory CONFIG:IMPL,...` measures instead the table bytes and the peak
resident memory of one forward pass (see peak_memory.py), for each listed
configuration and implementation (`ours` or `keras`) in turn;
`--reverse-memory FORMAT:IMPL,...` those of one reverse projection of a
ReversibleEmbedding (see reverse_projection.py); `--bags-memory CONFIG,...`
those of one forward pass of a bag layer (see bags.py).

The `sharded` section (see sharded.py) runs only when `--sections` names
it, on JAX (elsewhere it is skipped), in a process started with 8 virtual
CPU devices (`XLA_FLAGS` as above; run.py starts it so).
"""

import argparse
import gc
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bags
import keras
import native_floor
import peak_memory
import quantized
import reverse_projection
import sharded
import timing
import training
import vocab_scaling
from plan import (
    BAGS_MEMORY_CONFIGS,
    BAGS_NATIVE_BACKEND,
    SECTIONS,
    SHARDED_BACKEND,
    plan,
)
from timing import BACKEND, SEED

# "memory" in --sections: every configuration in turn, in this process.
# "sharded" needs a process started with virtual devices: named only.
SPEED_SECTIONS = tuple(s for s in SECTIONS if s not in ("memory", "sharded"))


def progress(text):
    # run.py echoes these lines; stdout is kept for the JSON result.
    print(f"[bench] {BACKEND} {text}", file=sys.stderr, flush=True)


def milliseconds(row, name):
    return f"{name} {row[name]['median_ms']:.3f} ms"


def collector(rows, describe, names):
    """A `report(**row)` callback: appends the row and prints its progress."""

    def report(**row):
        rows.append(row)
        progress(f"{describe(row)}: " + ", ".join(milliseconds(row, n) for n in names))

    return report


def measure_sections(args):
    current = plan(args.quick)
    sections = args.sections.split(",")
    result = {"backend": BACKEND}
    pair = ("ours", "keras")
    if "native_floor" in sections:
        rows = result["native_floor"] = []
        describe = "native floor {input_dim:,} rows {mode}".format_map
        native_floor.bench(current, collector(rows, describe, native_floor.CALLABLES))
    if "quantized" in sections:
        rows = result["quantized"] = []
        result["table_bytes"] = []
        quantized.bench(
            current,
            collector(rows, "{case} {mode}".format_map, pair),
            lambda **row: result["table_bytes"].append(row),
        )
    if "vocab_scaling" in sections:
        rows = result["vocab_scaling"] = []
        describe = "scaling {kind} {input_dim:,} rows lora={lora} {mode}".format_map
        vocab_scaling.bench(current, collector(rows, describe, pair))
    if "training" in sections:
        rows = result["training"] = []
        lookups = result["lookup_after_training"] = []
        training.bench(
            current,
            collector(
                rows,
                "training {input_dim:,} rows {mode}".format_map,
                training.variants(),
            ),
            collector(
                lookups,
                "lookup after training {input_dim:,} rows {variant} {call}".format_map,
                training.LOOKUP_TIMES,
            ),
        )
    if "bags" in sections:
        forward = result["bags"] = []
        steps = result["bags_training"] = []
        bags.bench(
            current,
            args.quick,
            collector(
                forward, "bags {input_dim:,} rows {mode}".format_map, bags.callables()
            ),
            collector(
                steps,
                "bags training {input_dim:,} rows {mode}".format_map,
                bags.train_variants(),
            ),
        )
    if "reverse_projection" in sections:
        rows = result["reverse_projection"] = []
        describe = "reverse {format} {input_dim:,} rows {hidden} {mode}".format_map
        reverse_projection.bench(
            current, collector(rows, describe, reverse_projection.CALLABLES)
        )
        # keras-hub is imported here only: the other sections never load it.
        import decoding

        rows = result["decoding"] = []
        describe = "decoding {format} vocab {vocab:,}".format_map
        decoding.bench(current, collector(rows, describe, ("ours", "keras")))
    if "sharded" in sections:
        if BACKEND == SHARDED_BACKEND:
            rows = result["sharded"] = []
            sharded.bench(current, collector(rows, sharded_description, ("step",)))
        else:
            progress("sharded: skipped (keras.distribution shards on JAX only)")
    if "memory" in sections:
        # Last: the measurements need no timing, and free what they build.
        result["memory"] = memory(current, peak_memory.MEASUREMENTS)
    if "reverse_projection" in sections and current["memory_in_timing_process"]:
        result["reverse_memory"] = reverse_memory(
            current, reverse_projection.MEMORY_MEASUREMENTS, args.quick
        )
    if "bags" in sections and current["memory_in_timing_process"]:
        result["bags_memory"] = bags_memory(current, bags_memory_configs())
    result["speed"] = [
        *native_floor.lookup_rows(current, result.get("native_floor", [])),
        *result.pop("quantized", []),
        *vocab_scaling.lora_case_rows(current, result.get("vocab_scaling", [])),
    ]
    if args.quick:
        # Tiny sizes and 3 repetitions can neither meet nor miss a target.
        for row in [*result["speed"], *result.get("reverse_projection", [])]:
            row["met"] = None
    return result


def sharded_description(row):
    return (
        f"sharded {row['config']} {row['input_dim']:,} rows {row['devices']} "
        f"devices: {row['max_device_bytes'] / 2**20:.1f} MiB per device "
        f"({row['over_ideal']:.2f}x ideal)"
    )


def memory(current, measurements):
    """`peak_memory.measure` of each `(config, impl)` in turn."""
    entries = []
    for config, impl in measurements:
        entry = peak_memory.measure(
            impl, config, current["memory_size"], current["memory_settle_polls"]
        )
        progress(
            f"memory {config} {impl}: table {entry['table_bytes'] / 2**20:.1f} MiB, "
            f"peak +{entry['peak_increase_mb']:.1f} MiB"
        )
        entries.append(entry)
    return entries


def reverse_memory(current, measurements, quick):
    """`reverse_projection.measure_memory` of each `(format, impl)` in turn."""
    entries = []
    for name, impl in measurements:
        entry = reverse_projection.measure_memory(
            impl,
            name,
            current["reverse_memory_size"],
            current["memory_settle_polls"],
        )
        progress(
            f"reverse memory {name} {impl}: table "
            f"{entry['table_bytes'] / 2**20:.1f} MiB, "
            f"peak +{entry['peak_increase_mb']:.1f} MiB"
        )
        if quick:
            # A tiny table's peaks are first-call setup: no target.
            entry["met"] = None
        entries.append(entry)
    return entries


def bags_memory_configs():
    """The bags section's memory configurations this backend measures."""
    return [
        config
        for config, _ in BAGS_MEMORY_CONFIGS
        if config != "native" or BACKEND == BAGS_NATIVE_BACKEND
    ]


def bags_memory(current, configs):
    """`bags.measure_memory` of each configuration in turn."""
    entries = []
    for config in configs:
        entry = bags.measure_memory(
            config, current["bags_size"], current["memory_settle_polls"]
        )
        progress(
            f"bags memory {config}: table {entry['table_bytes'] / 2**20:.1f} MiB, "
            f"peak +{entry['peak_increase_mb']:.1f} MiB"
        )
        entries.append(entry)
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run sizes")
    parser.add_argument(
        "--sections",
        default=",".join(SPEED_SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--memory",
        metavar="CONFIG:IMPL,...",
        help="measure peak memory instead, e.g. int4:ours,int4:keras; configs: "
        + ", ".join(peak_memory.CONFIGS),
    )
    parser.add_argument(
        "--reverse-memory",
        metavar="FORMAT:IMPL,...",
        help="measure the peak memory of a reverse projection instead, e.g. "
        "int8:ours; formats: " + ", ".join(reverse_projection.FORMATS),
    )
    parser.add_argument(
        "--bags-memory",
        metavar="CONFIG,...",
        help="measure the peak memory of a bag layer's forward pass instead, "
        "e.g. int4,native; configs: "
        + ", ".join(config for config, _ in BAGS_MEMORY_CONFIGS),
    )
    args = parser.parse_args()
    timing.RELEASE_MEMORY = not args.quick
    keras.utils.set_random_seed(SEED)
    # Keras's `Layer.__delattr__` collects garbage after deleting a variable
    # (every `quantize` does): the imports' objects (TensorFlow, JAX, PyTorch)
    # are left out of those collections, and of `release_memory`'s.
    gc.collect()
    gc.freeze()
    if args.memory:
        measurements = [m.split(":") for m in args.memory.split(",")]
        entries = memory(plan(args.quick), measurements)
        result = {"backend": BACKEND, "memory": entries}
    elif args.reverse_memory:
        measurements = [m.split(":") for m in args.reverse_memory.split(",")]
        entries = reverse_memory(plan(args.quick), measurements, args.quick)
        result = {"backend": BACKEND, "reverse_memory": entries}
    elif args.bags_memory:
        entries = bags_memory(plan(args.quick), args.bags_memory.split(","))
        result = {"backend": BACKEND, "bags_memory": entries}
    else:
        result = measure_sections(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

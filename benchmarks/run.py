"""Benchmarks keras_ext_embedding.Embedding against keras.layers.Embedding.

Run by `make bench`. Starts `bench_backend.py` once per backend (Keras reads
`KERAS_BACKEND` at its first import, so every backend needs a process of its
own), then once per (backend, implementation) for the peak memory of a LoRA
forward pass, prints the tables and writes them to `docs/benchmarks.md`.

    python benchmarks/run.py                         # full run, a few minutes
    python benchmarks/run.py --quick                 # smoke run, smaller sizes
    python benchmarks/run.py --backends jax,torch

`--quick` prints the tables but writes no file unless `--output` is given: the
docs keep the numbers of a full run.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.path.join(HERE, "bench_backend.py")
DEFAULT_OUTPUT = os.path.join(ROOT, "docs", "benchmarks.md")
BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "jax": ("jax", "jaxlib"),
    "torch": ("torch",),
}


def run_bench(backend, arguments):
    """Runs bench_backend.py on a backend; returns its JSON result."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend == "torch":
        # With OpenMP's default wait policy, on this loaded 2-core machine
        # every multi-threaded PyTorch op at times waited for a worker thread
        # to wake on the next scheduler tick: an 0.1 ms lookup took exactly
        # 8 ms, for both layers. A passive policy removes those stalls.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, BENCH, *arguments]
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        log = []
        for line in process.stderr:
            log.append(line)
            if line.startswith("[bench]"):
                print("  " + line[len("[bench] ") :], end="", flush=True)
        if process.wait() != 0:
            sys.stderr.write("".join(log[-40:]))
            raise RuntimeError(f"{' '.join(command)} failed on {backend}")
        stdout.seek(0)
        return json.loads(stdout.read().strip().splitlines()[-1])


def machine():
    with open("/proc/cpuinfo") as cpuinfo:
        models = re.findall(r"model name\s*:\s*(.*)", cpuinfo.read())
    with open("/proc/meminfo") as meminfo:
        kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read()).group(1))
    versions = {"python": platform.python_version()}
    for package in ("keras", "numpy", "tensorflow-cpu", "jax", "jaxlib", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "ram_gib": kib / 2**20,
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def milliseconds(summary):
    median = summary["median_ms"]
    digits = 3 if median < 1 else 2 if median < 10 else 1 if median < 100 else 0
    return f"{median:.{digits}f} ± {summary['iqr_ms'] / 2:.{digits}f}"


def verdict(met):
    return "n/a" if met is None else "yes" if met else "**no**"


def speed_table(results):
    lines = [
        "| backend | case | mode | ours | reps | ours (ms) | keras (ms) "
        "| ours/keras | keras/ours | target | met |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            variant = f"invalid_ids={row['variant']!r}"
            lines.append(
                f"| {result['backend']} | {row['case']} ({row['input_dim']:,} rows) "
                f"| {row['mode']} | {variant} | {row['ours']['reps']} "
                f"| {milliseconds(row['ours'])} "
                f"| {milliseconds(row['keras'])} | {row['ratio']:.2f} "
                f"| {1 / row['ratio']:.1f}x | {row['target']} | {verdict(row['met'])} |"
            )
    return "\n".join(lines)


MEMORY_CASES = {
    "lora": "float32 table, LoRA",
    "int4": "int4 table (groups of 128)",
    "int4_lora": "int4 table, LoRA",
}


def memory_table(memory):
    lines = [
        "| backend | case | layer | peak RSS increase (MiB) "
        "| input_dim x output_dim (MiB) | output (MiB) | table-sized temporary |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for entry in memory:
        # A temporary the size of the table shows as an increase of at least
        # half the table; ours should stay near the output size.
        temporary = entry["peak_increase_mb"] >= entry["table_mb"] / 2
        lines.append(
            f"| {entry['backend']} | {MEMORY_CASES[entry['case']]} | {entry['impl']} | "
            f"{entry['peak_increase_mb']:.1f} | {entry['table_mb']:.0f} | "
            f"{entry['output_mb']:.1f} | {'yes' if temporary else 'no'} |"
        )
    return "\n".join(lines)


def table_bytes_table(results):
    lines = [
        "| backend | table | input_dim | ours (MiB) | keras (MiB) "
        "| float32 (MiB) | float32/ours | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    targets = {"int8": 3.8, "int4 per row": 7.4, "int4 block 128": 7.4}
    for result in results:
        for row in result.get("table_bytes", []):
            smaller = row["float32_bytes"] / row["ours_bytes"]
            target = targets[row["config"]]
            lines.append(
                f"| {result['backend']} | {row['config']} | {row['input_dim']:,} "
                f"| {row['ours_bytes'] / 2**20:.1f} | {row['keras_bytes'] / 2**20:.1f} "
                f"| {row['float32_bytes'] / 2**20:.1f} | {smaller:.2f}x "
                f"| >= {target}x | {verdict(smaller >= target)} |"
            )
    return "\n".join(lines)


def memory_targets_met(memory):
    """Ours must add no table-sized temporary. Keras's rows are for comparison:
    an allocator that serves a temporary from memory it already holds (as
    TensorFlow's does) hides it from the resident set size."""
    return all(
        entry["peak_increase_mb"] < entry["table_mb"] / 2
        for entry in memory
        if entry["impl"] == "ours"
    )


def report(args, info, results, memory, seconds):
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    quick = " (`--quick`: smaller sizes, few repetitions)" if args.quick else ""
    memory_rows = memory_table(memory) if memory else "(not measured)"
    memory_dim = f"{memory[0]['input_dim']:,}" if memory else "-"
    memory_met = "met" if memory and memory_targets_met(memory) else "**not met**"
    return f"""# Benchmarks

Generated by `make bench` (`python benchmarks/run.py`){quick} on
{info["date"]}, in {seconds / 60:.1f} minutes. Do not edit by hand: rerun
the command to refresh the numbers.

`keras_ext_embedding.Embedding` ("ours", default configuration:
`invalid_ids="raise"`, plus `invalid_ids="zeros"` for plain lookups) against
`keras.layers.Embedding` ("keras"), both in the same process on the same ids
(a `64 x 32` int32 batch, already a backend tensor) and the same weights,
`output_dim=128`, LoRA rank 8.

## Machine

- CPU: {info["cpu"]}, {info["cores"]} cores; RAM {info["ram_gib"]:.0f} GiB;
  {info["os"]}; no GPU used.
- Versions: {versions}.

The machine is shared with other jobs (test suites of other work ran at the
same time) and has only {info["cores"]} cores, so single timings are noisy,
at times by a factor of two. Every number below is a **median** over
repetitions (`reps`), shown as `median ± IQR/2` (half the interquartile
range). Each repetition times ours and Keras's back to back, alternating
which goes first, so that load from other processes hits both alike; ratios
of medians are steadier than the absolute times. Differences within about
10% are within the noise of this machine.

## Speed

`ours/keras` below 1 means ours is faster; `keras/ours` is the speedup.

{speed_table(results)}

## Table memory of the quantized layers

The bytes of every variable of the layer (quantized table, scales, zero
points, `g_idx`), against the float32 table, `output_dim=128`. Ours and
Keras's hold the same variables.

{table_bytes_table(results)}

## Peak memory of one forward pass

`input_dim={memory_dim}`, `output_dim=128`, LoRA rank 8. Cases: a float32
table with LoRA (the table alone is 488 MiB at 1M rows), an int4 table in
Keras's default groups of 128, and the int4 table with LoRA. Each row is a
fresh process (one per backend, case and layer). Imports and first-call setup
run on a small layer; then the layer is built (an int4 layer directly with
the dtype policy `int4/128_from_float32`: quantizing a float table first
would leave TensorFlow's allocator holding the freed table, and the forward
pass's temporaries would reuse it unseen), its variables are waited for,
and the process waits until its resident set size stays put for a second
(JAX computes and frees the initializer's gigabyte of temporaries
asynchronously, after `build()` returns). Then the peak resident
set size is lowered to the current one (`/proc/self/clear_refs`) and the
increase of the peak (`resource.getrusage(...).ru_maxrss`) over one eager
forward pass is reported. Memory an allocator reuses without asking the OS
does not show, so an increase is a lower bound of what the pass allocates.
"table-sized temporary" means an increase of at least half an
`input_dim x output_dim` array in the dtype such a temporary would have:
float32 for the float table, int8 for an unpacked int4 table.

{memory_rows}

Target: ours adds no `input_dim x output_dim` temporary: {memory_met}.
Keras's layer makes one in every case (the unit suite shows it in the
computation itself); where a Keras row shows none, its allocator served the
temporary from memory it already held, which the resident set size does not
see.

## How it is measured

- `benchmarks/run.py` starts `benchmarks/bench_backend.py` in one process per
  backend (`KERAS_BACKEND` set, `TF_CPP_MIN_LOG_LEVEL=3`), then one process
  per (backend, layer) for memory. `--quick` runs smaller sizes and fewer
  repetitions, `--backends jax,torch` a subset.
- Every callable is warmed up first (first calls trace and compile), then
  timed with `time.perf_counter()`. JAX dispatches asynchronously, so each
  timed call ends with `jax.block_until_ready` on its result; TensorFlow and
  PyTorch on CPU return finished tensors; `train_on_batch` returns the loss
  as Python floats, after the step has finished.
- Before timing, the outputs of both layers are checked equal on the ids.
- **lookup**: no LoRA. *eager*: `layer(ids)`. *tf.function*:
  `tf.function(layer.__call__, jit_compile=False)`; *tf.function XLA*: the
  same with `jit_compile=True`. *jax.jit*: `jax.jit` of
  `layer.stateless_call(trainable, non_trainable, ids)`. *torch.compile*:
  `torch.compile(layer.__call__)`, for information only: on CPU each first
  call compiles for seconds, and the compiled call is slower than eager for
  both layers (guards and graph breaks in Keras's `Layer.__call__`); Keras
  itself does not compile on PyTorch by default.
- **lora_forward**: `lora_rank=8` for both layers, with a non-zero `B` so
  that the delta is real work; eager and compiled as above.
- **int8 / int4 lookup**: no LoRA, `input_dim=1,000,000` (100,000 with
  `--quick`); both layers quantized alike from the same float table with
  `quantize(mode, config=...)`: int8, int4 with one scale per row
  (`block_size=None`), and int4 in Keras's default groups of 128. Keras's
  int4 call unpacks the whole table before its gather; ours gathers the packed
  rows and unpacks those.
- **int8 / int4 LoRA forward**: the same quantized tables with `enable_lora(8)`
  and a non-zero `B`; ours on int8 and on int4 (groups of 128) against Keras's
  LoRA on int8 (the target), and ours on int4 against Keras's on int4 (for
  information).
- **lora_train**: `Input -> Embedding(lora_rank=8) -> GlobalAveragePooling1D`,
  `compile(SGD(0.01), "mse")`, one `model.train_on_batch(ids, targets)` per
  repetition. Keras's default execution per backend: XLA on JAX,
  `tf.function` without XLA on a TensorFlow CPU, eager on PyTorch (where
  ours checks the ids on the host at every step).
- In the LoRA cases, a Keras call at 1M rows leaves work running after it
  returns (gigabytes of temporaries to free), which slowed whatever call came
  next: timed right after it, our JAX training step measured 5x its steady
  time. So there each timed call follows an untimed call of the same layer,
  which absorbs the other layer's leftovers; each layer still pays for its
  own previous call, as in a training loop.
- PyTorch runs with `OMP_WAIT_POLICY=PASSIVE` (unless set otherwise): with
  the default policy, on this loaded machine, every multi-threaded op at
  times stalled until the next scheduler tick, so that a 0.1 ms lookup took
  exactly 8 ms for both layers.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: smaller sizes, few reps"
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of tensorflow,jax,torch",
    )
    parser.add_argument(
        "--output",
        help=f"markdown file to write (default: {DEFAULT_OUTPUT} on a full run, "
        "none with --quick)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak memory processes"
    )
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    quick = ["--quick"] if args.quick else []

    start = time.monotonic()
    info = machine()
    results = []
    for backend in backends:
        print(f"[{backend}] speed", flush=True)
        results.append(run_bench(backend, quick))
    memory = []
    if not args.no_memory:
        for backend in backends:
            for case, impl in itertools.product(MEMORY_CASES, ("ours", "keras")):
                print(f"[{backend}] peak memory, {case}, {impl}", flush=True)
                entry = run_bench(
                    backend, [*quick, "--memory", impl, "--memory-case", case]
                )
                print(f"  {entry['peak_increase_mb']:.1f} MB", flush=True)
                memory.append(entry)
    seconds = time.monotonic() - start

    print()
    print(speed_table(results))
    print()
    print(table_bytes_table(results))
    if memory:
        print()
        print(memory_table(memory))
    missed = [
        f"{r['backend']} {row['case']} {row['mode']} {row['variant']}"
        for r in results
        for row in r["rows"]
        if row["met"] is False
    ]
    if memory and not memory_targets_met(memory):
        missed.append("peak memory")
    print(f"\nTargets missed: {', '.join(missed) if missed else 'none'}")
    print(f"Total: {seconds / 60:.1f} minutes")
    if output:
        with open(output, "w") as file:
            file.write(report(args, info, results, memory, seconds))
        print(f"Wrote {os.path.relpath(output, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

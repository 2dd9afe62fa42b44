"""Benchmarks keras_ext_embedding.Embedding against keras.layers.Embedding.

Run by `make bench`. Starts `bench_backend.py` once per backend and section
for the timings (Keras reads `KERAS_BACKEND` at its first import, so every
backend needs a process of its own; a fresh one per section keeps what one
section leaves in memory from the next), then fresh processes for peak
memory, and
writes `benchmarks.md`, `benchmarks.json` and the figures in `img/` to the
output directory. The `reverse_projection` section benchmarks
`keras_ext_embedding.ReversibleEmbedding` against
`keras.layers.ReversibleEmbedding` (logits, their peak memory, and greedy
decoding with a keras-hub causal LM): about an hour of a full run. The
`training` section times one training step of big tables (dense, and
row-sparse with `Embedding(optimizer=...)`) up to 4M rows, and lookups
after a training step: an estimated 15 minutes. The `bags` section
benchmarks `keras_ext_embedding.EmbeddingBag` on a DLRM-like batch of bags
against keras-rs `EmbedReduce`, hand-written `keras.ops` and (PyTorch)
`torch.nn.EmbeddingBag`: forward passes, training steps and peak memory at
1M rows, about 15 minutes. The `sharded` section shards tables by rows with
`keras.distribution` on JAX only, over 1 to 8 virtual CPU devices (a
process of its own, with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`): the bytes per
device of a table and its Adam moments, and the time of a training step,
for Keras's layer with dense Adam and ours with `optimizer="adam"`, at 1M
and 4M rows, about 1.5 minutes; a `--quick` run leaves it out unless
`--sections` names it. The other sections take about 20 minutes.

    python benchmarks/run.py                      # full run, docs/, ~95 min
    python benchmarks/run.py --quick              # smoke run, a temporary dir
    python benchmarks/run.py --quick --output-dir /tmp/bench
    python benchmarks/run.py --backends jax,torch --output-dir /tmp/bench
    python benchmarks/run.py --sections reverse_projection --output-dir /tmp/bench
    python benchmarks/run.py --quick --sections bags --output-dir /tmp/bench
    python benchmarks/run.py --quick --sections sharded --output-dir /tmp/bench
    python benchmarks/run.py --from-json docs/benchmarks.json --output-dir docs
    python benchmarks/run.py --backends tensorflow --sections reverse_projection \
        --update docs/benchmarks.json             # remeasure, keep the rest

A full run writes to `docs/` unless `--output-dir` says otherwise; `--quick`
without `--output-dir` writes to a fresh temporary directory and prints its
path, so a smoke run never overwrites the published numbers. `--from-json`
redraws the page and figures from an earlier run's JSON without measuring.
`--update` measures the chosen backends and sections again (after a fix to
one of them) and puts their results into an earlier run's JSON, keeping
every other section's, and records the update in it.
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
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import plots
import quoted
import report
import summary
from plan import (
    BAGS_MEMORY_CONFIGS,
    BAGS_NATIVE_BACKEND,
    BATCH_SHAPE,
    LORA_RANK,
    MEMORY_CONFIGS,
    OUTPUT_DIM,
    QUICK_OPT_IN,
    REVERSE_FORMATS,
    REVERSE_HIDDEN_SHAPES,
    REVERSE_OUTPUT_DIM,
    SECTIONS,
    SHARDED_BACKEND,
    SHARDED_XLA_FLAG,
    plan,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.path.join(HERE, "bench_backend.py")
DEFAULT_OUTPUT_DIR = os.path.join(ROOT, "docs")
BACKENDS = ("tensorflow", "jax", "torch")
IMPLS = ("ours", "keras")


def run_bench(backend, arguments, extra_env=None):
    """Runs bench_backend.py on a backend, with `extra_env` added to the
    environment; returns its JSON result."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.update(extra_env or {})
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


def run_all(jobs, runs):
    """Runs `(backend, arguments[, extra_env])`, `jobs` at a time; returns their
    results in order. Timings run one at a time (`jobs=1`): processes running
    side by side on 2 cores would slow each other unevenly. The first
    failure cancels the runs not yet started."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_bench, *run) for run in runs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def memory_runs(backends, sections):
    """`(backend, ["--memory", "CONFIG:IMPL"])`: one run per backend,
    configuration and layer; `["--reverse-memory", "FORMAT:IMPL"]` for the
    reverse projection; and `["--bags-memory", "CONFIG"]` for the bags
    section (its "native" configuration on PyTorch only)."""
    for backend in backends:
        if "memory" in sections:
            for (config, _), impl in itertools.product(MEMORY_CONFIGS, IMPLS):
                yield backend, ["--memory", f"{config}:{impl}"]
        if "reverse_projection" in sections:
            for (name, _), impl in itertools.product(REVERSE_FORMATS, IMPLS):
                yield backend, ["--reverse-memory", f"{name}:{impl}"]
        if "bags" in sections:
            for config, _ in BAGS_MEMORY_CONFIGS:
                if config != "native" or backend == BAGS_NATIVE_BACKEND:
                    yield backend, ["--bags-memory", config]


def sharded_env():
    """The environment of the sharded section's process: 8 virtual CPU
    devices (added to any `XLA_FLAGS` already set)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {SHARDED_XLA_FLAG}"
    return {"XLA_FLAGS": flags.strip()}


def timing_runs(args, backends, sections):
    """`(backend, ["--sections", ...][, extra_env])`: a full run gives each
    section a process of its own, so that what one section leaves behind
    (TensorFlow keeps every traced custom gradient, and with it the tables
    it captured) cannot starve the next; a quick run's tiny sizes share one
    process per backend. The sharded section always has a process of its
    own, on JAX only, with virtual devices."""
    quick = ["--quick"] if args.quick else []
    shared = [s for s in sections if s != "sharded"]
    if not shared:
        runs = []
    elif args.quick:
        runs = [(b, [*quick, "--sections", ",".join(shared)]) for b in backends]
    else:
        runs = [(b, ["--sections", section]) for b in backends for section in shared]
    if "sharded" in sections:
        if SHARDED_BACKEND in backends:
            arguments = [*quick, "--sections", "sharded"]
            runs.append((SHARDED_BACKEND, arguments, sharded_env()))
        else:
            print("sharded: not run, keras.distribution shards variables on JAX only")
    return runs


def merge(result, output):
    """Adds one process's `output` to its backend's `result`: the lists that
    several processes fill (`speed`, `memory`, ...) are extended."""
    for name, value in output.items():
        if isinstance(value, list):
            result.setdefault(name, []).extend(value)
        else:
            result[name] = value


def measure(args, backends, current):
    """Runs every process; returns `{backend: result}`."""
    in_process = current["memory_in_timing_process"]
    sections = [s for s in args.sections if s != "memory" or in_process]
    runs = timing_runs(args, backends, sections)
    # A quick run's timings mean nothing anyway: its processes share the
    # cores, which keeps the smoke run short.
    outputs = run_all(len(runs) if args.quick else 1, runs)
    if not in_process:
        memory = list(memory_runs(backends, args.sections))
        runs += memory
        outputs += run_all(args.jobs, memory)
    results = {backend: {"backend": backend, "memory": []} for backend in backends}
    for (backend, *_), output in zip(runs, outputs, strict=True):
        merge(results[backend], output)
    return results


def now():
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command_line():
    """This run's command, as the page quotes it."""
    return shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])


def machine():
    with open("/proc/cpuinfo") as cpuinfo:
        models = re.findall(r"model name\s*:\s*(.*)", cpuinfo.read())
    with open("/proc/meminfo") as meminfo:
        kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read()).group(1))
    versions = {"python": platform.python_version()}
    for package in (
        "keras",
        "numpy",
        "tensorflow-cpu",
        "jax",
        "jaxlib",
        "torch",
        "matplotlib",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "ram_gib": kib / 2**20,
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "date": now(),
    }


def document(args, backends, current, results, seconds):
    """The JSON document of a run: everything the report is drawn from."""
    settings = {
        "batch_shape": list(BATCH_SHAPE),
        "output_dim": OUTPUT_DIM,
        "lora_rank": LORA_RANK,
        "reverse_output_dim": REVERSE_OUTPUT_DIM,
        "reverse_hidden_shapes": REVERSE_HIDDEN_SHAPES,
        **current,
    }
    # JSON object keys are strings; repetitions per size keep int keys here.
    settings = json.loads(json.dumps(settings))
    return {
        "command": command_line(),
        "quick": args.quick,
        "duration_s": seconds,
        "machine": machine(),
        "backends": backends,
        "sections": list(args.sections),
        "settings": settings,
        "headline": summary.headline(results, current),
        "results": results,
    }


def earlier_run(args):
    """The JSON document `--update` names, refused before anything is
    measured if it is from a run of the other kind (quick or full)."""
    with open(args.update) as file:
        previous = json.load(file)
    if previous["quick"] != args.quick:
        kind = "a --quick" if previous["quick"] else "a full"
        raise SystemExit(
            f"--update: {args.update} is from {kind} run; run with the same "
            "--quick setting, or its sizes and numbers would mix."
        )
    return previous


def measured_backends(results):
    """The backends some process measured something on (the sharded
    section runs on JAX only)."""
    return [
        backend
        for backend, result in results.items()
        if any(value for name, value in result.items() if name != "backend")
    ]


def updated(previous, args, results, current, seconds):
    """`previous` (an earlier run's JSON document) with the sections just
    measured in `results` put in; a list this run left empty (a section it
    did not measure) keeps the earlier run's."""
    for backend, result in results.items():
        target = previous["results"].setdefault(backend, {"backend": backend})
        for name, value in result.items():
            if value != []:
                target[name] = value
    previous["backends"] = [b for b in BACKENDS if b in previous["results"]]
    measured = set(previous["sections"]) | set(args.sections)
    previous["sections"] = [s for s in SECTIONS if s in measured]
    previous["headline"] = summary.headline(previous["results"], current)
    here = machine()
    previous.setdefault("updates", []).append(
        {
            "command": command_line(),
            "date": here["date"],
            # The machine can differ from the earlier run's: the page says so.
            "cpu": here["cpu"],
            "cores": here["cores"],
            "duration_s": seconds,
            "backends": measured_backends(results),
            "sections": args.sections,
        }
    )
    return previous


def write_outputs(data, output_dir):
    """Writes benchmarks.json, the figures in img/ and benchmarks.md."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "benchmarks.json"), "w") as file:
        json.dump(data, file, indent=1)
        file.write("\n")
    images = plots.write_all(data["results"], os.path.join(output_dir, "img"))
    with open(os.path.join(output_dir, "benchmarks.md"), "w") as file:
        file.write(report.markdown(data, images))


def missed_targets(data):
    """`backend case mode variant` of every speed row that missed its target,
    then those of the reverse projection's rows and peak memory, and of the
    bags section's forward and training rows, and of the sharded section's
    bytes per device."""
    missed = []
    for backend, result in data["results"].items():
        missed += [
            f"{backend} {row['case']} {row['mode']} {row['variant']}"
            for row in result.get("speed", [])
            if row["met"] is False
        ]
        missed += [
            f"{backend} reverse {row['format']} {row['input_dim']:,} rows "
            f"{row['hidden']} {row['mode']}"
            for row in result.get("reverse_projection", [])
            if row["met"] is False
        ]
        missed += [
            f"{backend} reverse memory {entry['format']}"
            for entry in result.get("reverse_memory", [])
            if entry["met"] is False
        ]
        missed += [
            f"{backend} bags {row['mode']} {ratio}"
            for row in result.get("bags", [])
            for ratio, met in row["met"].items()
            if met is False
        ]
        missed += [
            f"{backend} bags training {row['mode']}"
            for row in result.get("bags_training", [])
            if row["met"] is False
        ]
        missed += [
            f"{backend} sharded {row['config']} {row['input_dim']:,} rows "
            f"{row['devices']} devices bytes per device"
            for row in result.get("sharded", [])
            if row["met"] is False
        ]
    return missed


def token_mismatches(data):
    """`backend format` of every decoding whose tokens differ from Keras's."""
    return [
        f"{backend} {row['format']}"
        for backend, result in data["results"].items()
        for row in result.get("decoding", [])
        if not row["same_tokens"]
    ]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny sizes, few reps"
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of tensorflow,jax,torch",
    )
    parser.add_argument(
        "--sections",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; "
        f"--quick leaves out {','.join(QUICK_OPT_IN)})",
    )
    parser.add_argument(
        "--output-dir",
        help="where benchmarks.md, benchmarks.json and img/ go (default: docs/ "
        "on a full run, a new temporary directory with --quick)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory processes run at once (default 2; timings: always one)",
    )
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="redraw the page and figures from this JSON; measure nothing",
    )
    parser.add_argument(
        "--update",
        metavar="PATH",
        help="measure --backends and --sections again and put their results "
        "into this earlier run's JSON, keeping the rest",
    )
    args = parser.parse_args()
    if args.update and args.from_json:
        parser.error("--update measures and --from-json does not: choose one")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.sections is None:
        left_out = QUICK_OPT_IN if args.quick else ()
        args.sections = ",".join(s for s in SECTIONS if s not in left_out)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name, chosen, known in (
        ("backends", args.backends, BACKENDS),
        ("sections", args.sections, SECTIONS),
    ):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {list(known)}")
    return args


def output_dir_of(args):
    if args.output_dir:
        return args.output_dir
    if args.quick:
        return tempfile.mkdtemp(prefix="keras_ext_embedding_bench_")
    return DEFAULT_OUTPUT_DIR


def main():
    args = parse_args()
    output_dir = output_dir_of(args)
    if args.from_json:
        with open(args.from_json) as file:
            data = json.load(file)
    else:
        previous = earlier_run(args) if args.update else None
        current = plan(args.quick)
        start = time.monotonic()
        results = measure(args, args.backends, current)
        seconds = time.monotonic() - start
        if previous is not None:
            data = updated(previous, args, results, current, seconds)
        else:
            data = document(args, args.backends, current, results, seconds)
        missed = missed_targets(data)
        print(f"Targets missed: {', '.join(missed) if missed else 'none'}")
        differ = token_mismatches(data)
        if differ:
            print(f"Generated tokens differ from Keras's: {', '.join(differ)}")
        print(f"Total: {seconds / 60:.1f} minutes")
    write_outputs(data, output_dir)
    print(f"Wrote benchmarks.md, benchmarks.json and img/ to {output_dir}")
    if os.path.realpath(output_dir) == os.path.realpath(DEFAULT_OUTPUT_DIR):
        return rewrite_quoted_figures(data)
    return 0


def rewrite_quoted_figures(data):
    """The figures README.md and the guides quote (quoted.py), from the
    JSON just written: a run into docs/ updates every page, or says which
    page quotes what it no longer has."""
    try:
        pages = quoted.rendered_pages(data)
    except (LookupError, KeyError) as error:
        print(f"The pages' figures were not rewritten: {error}", file=sys.stderr)
        return 1
    stale = [page for page, (old, new) in pages.items() if old != new]
    for page in stale:
        with open(os.path.join(ROOT, page), "w") as file:
            file.write(pages[page][1])
    print(f"Rewrote the figures of {', '.join(stale) or 'no page'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

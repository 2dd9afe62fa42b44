"""Runs the unit suite once per backend, and `integration/` as two suites.

    python tests/run_backends.py                      # all three backends
    python tests/run_backends.py jax torch            # these backends only
    python tests/run_backends.py --only unit torch    # or --only integration
    python tests/run_backends.py --jobs 1             # one suite at a time
    python tests/run_backends.py --durations 20       # each suite's 20 slowest

`KERAS_BACKEND` is read when keras is first imported, so every backend gets a
process of its own. The integration run covers the listed backends through
`INTEGRATION_BACKENDS` (integration/processes.py). The suites run side by
side, as many at once as the machine has cores (`--jobs`): a unit suite keeps
one core busy, so on two cores two suites take about the time of one. Prints
one summary line per run and exits non-zero when any run fails or runs no
test. Under each summary it prints the suite's slowest tests (`--durations`,
default 10), so that the time `make test` takes can be kept in check.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = Path(__file__).resolve().parents[1]
# The integration tests run as two suites side by side: those that run whole
# programs (`make bench --quick`, the examples of `make demo`), and the rest
# (every other module, whatever its name), which save, load and export
# models. Each alone took about half the time of one suite.
PROGRAMS = ("test_bench.py", "test_demo.py")
SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed|error|skipped).*?) in [\d.]+s", re.M)
# pytest's `--durations` table: its header, then one line per test phase.
SLOWEST = re.compile(r"^=+ slowest \d+ durations =+\n((?:[\d.]+s .*\n)+)", re.M)
# Longest first, so that the last suite to start is a short one: integration,
# then the unit suites by their usual length.
DURATION_ORDER = ("integration", "jax", "programs", "tensorflow", "torch")
# XLA (JAX, and TensorFlow's jit_compile) compiles thousands of small
# programs in a run: about half the JAX unit suite's CPU time. LLVM's
# optimization level changes the machine code, not the arithmetic (XLA's
# CPU code never reassociates floats; its HLO passes are the same), and
# -O0 takes 12% off the JAX run of test_embedding_bag.py. Added to any
# XLA_FLAGS already set; the integration scripts inherit it.
FAST_XLA_COMPILE = "--xla_backend_optimization_level=0"


def run(label, backend, paths, env=None, durations=0):
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_COMPILE}"
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": xla_flags.strip(),
        **(env or {}),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *paths]
    if durations:
        command += [f"--durations={durations}", "--durations-min=1"]
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    summaries = SUMMARY.findall(output)
    summary = summaries[-1] if summaries else "no pytest summary"
    ran = bool(re.search(r"\d+ passed", summary))
    ok = done.returncode == 0 and ran
    # One write per suite: suites that finish together do not interleave.
    report = "" if ok else output
    report += f"{label:<22} {'ok' if ok else 'FAILED':<7} {summary} ({seconds:.0f}s)\n"
    slowest = SLOWEST.search(output)
    if slowest:
        report += "".join(f"    {line}\n" for line in slowest.group(1).splitlines())
    sys.stdout.write(report)
    sys.stdout.flush()
    return ok


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "backends", nargs="*", metavar="BACKEND", help=f"default: {' '.join(BACKENDS)}"
    )
    parser.add_argument(
        "--only", choices=("unit", "integration"), help="run one of the two suites"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="suites run at once (default: the number of cores)",
    )
    parser.add_argument(
        "--durations",
        type=int,
        default=10,
        help="print each suite's N slowest tests (default 10; 0: none)",
    )
    args = parser.parse_args()
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; received {args.jobs}")
    if args.durations < 0:
        parser.error(f"--durations must be 0 or more; received {args.durations}")
    # In BACKENDS' order, once each, as integration/processes.py selects them.
    args.backends = [b for b in BACKENDS if b in args.backends] or list(BACKENDS)
    return args


def suites(args):
    """`{name: (label, backend, paths, env)}` of the runs `args` select."""
    selected = {}
    if args.only != "integration":
        for b in args.backends:
            selected[b] = (f"unit[{b}]", b, ["tests"], None)
    if args.only != "unit":
        # The integration tests start a process per backend themselves; these
        # never import keras. Their JAX processes share one compilation cache
        # (integration/processes.py), removed when the run ends.
        suffix = ""
        if args.backends != list(BACKENDS):
            suffix = f"[{','.join(args.backends)}]"
        env = {
            "INTEGRATION_BACKENDS": " ".join(args.backends),
            "JAX_COMPILATION_CACHE_DIR": args.jax_cache,
        }
        programs = [f"integration/{name}" for name in PROGRAMS]
        rest = [
            f"integration/{path.name}"
            for path in sorted((ROOT / "integration").glob("test_*.py"))
            if path.name not in PROGRAMS
        ]
        selected["integration"] = (f"integration{suffix}", "tensorflow", rest, env)
        selected["programs"] = (f"bench+demos{suffix}", "tensorflow", programs, env)
    return [selected[name] for name in DURATION_ORDER if name in selected]


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="jax-cache-") as args.jax_cache:
        return run_suites(args)


def run_suites(args):
    runs = suites(args)
    with ThreadPoolExecutor(min(args.jobs, len(runs))) as pool:
        results = list(
            pool.map(lambda suite: run(*suite, durations=args.durations), runs)
        )
    if not all(results):
        print("FAILED: see the output above.")
        return 1
    print("All suites passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

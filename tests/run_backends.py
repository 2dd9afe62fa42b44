"""Runs the unit suite once per backend, then `integration/`, one process each.

`KERAS_BACKEND` is read when keras is first imported, so every backend gets a
process of its own. Prints one summary line per run and exits non-zero when any
run fails or runs no test.
"""

import os
import re
import subprocess
import sys
import time

SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed|error|skipped).*?) in [\d.]+s", re.M)


def run(label, backend, paths):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *paths]
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    summaries = SUMMARY.findall(output)
    summary = summaries[-1] if summaries else "no pytest summary"
    ran = bool(re.search(r"\d+ passed", summary))
    ok = done.returncode == 0 and ran
    if not ok:
        sys.stdout.write(output)
    print(f"{label:<22} {'ok' if ok else 'FAILED':<7} {summary} ({seconds:.0f}s)")
    return ok


def main(backends):
    results = [run(f"unit[{b}]", b, ["tests"]) for b in backends]
    results.append(run("integration", "tensorflow", ["integration"]))
    if not all(results):
        print("FAILED: see the output above.")
        return 1
    print("All suites passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["tensorflow", "jax", "torch"]))

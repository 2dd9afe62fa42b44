"""The save/load scripts of the integration tests, in one process per backend.

    python saved_everywhere.py save DIR             # every script's save
    python saved_everywhere.py load DIR SAVER...    # every script's load

Each script of SCRIPTS saves its models (or trains, for training.py) in its
first round and loads what every backend saved in its second, in DIR/<script>/
as when run alone. A process imports its backend and keras once (seconds of
CPU each): four scripts, two rounds and three backends cost 6 processes here
instead of 24.
"""

import importlib
import sys
from pathlib import Path

import keras

# The scripts and their two rounds' functions, in the order they run.
SCRIPTS = {
    "cross_backend": ("save", "load"),
    "bags": ("save", "load"),
    "layer_outputs": ("save", "load"),
    "training": ("train", "resume"),
}


def run(script, command, root, savers):
    module = importlib.import_module(script)
    save, load = SCRIPTS[script]
    if script == "training":
        module.main(save if command == "save" else load, root, *savers)
    elif command == "save":
        getattr(module, save)(root)
    else:
        getattr(module, load)(root, *savers)


def main(command, root, *savers):
    if command not in ("save", "load"):
        raise SystemExit(f"usage: {__doc__.splitlines()[2].strip()}")
    for script in SCRIPTS:
        # What one script leaves (a dtype policy, the names Keras counts
        # up) must not reach the next, as in a process of its own.
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()
        run(script, command, Path(root) / script, savers)
        print(f"{script} {command} under {keras.config.backend()}: ok")


if __name__ == "__main__":
    main(*sys.argv[1:])

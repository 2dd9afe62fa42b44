"""Table bytes and the peak resident memory one forward pass adds.

A full run measures one (configuration, layer) per fresh process: a peak,
once reached, hides every smaller one after it, and memory an allocator has
freed serves later temporaries unseen. Imports and first-call setup run on a
small layer; then the layer is built directly in its dtype policy (an int4
layer with `int4/128_from_float32`: quantizing a float table first would
leave TensorFlow's allocator holding the freed table, and the forward pass's
temporaries would reuse it unseen), its variables are waited for, and the
process waits until its resident set size stays put. Then the peak is
lowered to the current size and one eager forward pass is measured.
"""

import re
import resource
import time

import keras
import numpy as np
from keras import ops
from layers import nonzero_lora_b, variable_bytes
from plan import LORA_RANK, OUTPUT_DIM
from timing import block, make_ids, release_memory

import keras_ext_embedding

LAYER_CLASSES = {
    "ours": keras_ext_embedding.Embedding,
    "keras": keras.layers.Embedding,
}

# name: (dtype policy, LoRA, bytes per entry of a table-sized temporary the
# call could make: a float32 table with the LoRA delta added, a float32
# dequantized int8 table, an int4 table unpacked to int8).
CONFIGS = {
    "float32": (None, False, 4),
    "bfloat16": ("bfloat16", False, 2),
    "int8": ("int8_from_float32", False, 4),
    "int4": ("int4/128_from_float32", False, 1),
    "float32_lora": (None, True, 4),
    "int4_lora": ("int4/128_from_float32", True, 1),
}


# Every (configuration, implementation) a run measures.
MEASUREMENTS = [(config, impl) for config in CONFIGS for impl in LAYER_CLASSES]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


def wait_for_rss_to_settle(interval, steady_polls, timeout=15.0):
    """Waits until the resident set size stays put for `steady_polls` polls
    `interval` seconds apart (a full run: a second).

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


def make_layer(impl, config, input_dim):
    dtype, lora, _ = CONFIGS[config]
    layer = LAYER_CLASSES[impl](input_dim, OUTPUT_DIM, dtype=dtype)
    layer.build()
    if lora:
        layer.enable_lora(LORA_RANK)
        layer.lora_embeddings_b.assign(nonzero_lora_b())
    return layer


def measure(impl, config, input_dim, settle_polls):
    """One entry: the layer's variable bytes and its forward pass's peak.

    `settle_polls`: `(interval, steady_polls)` of wait_for_rss_to_settle.
    """
    # First-call setup (kernels, dispatch caches) outside the measured window.
    block(make_layer(impl, config, 1000)(ops.convert_to_tensor(make_ids(1000))))
    ids = ops.convert_to_tensor(make_ids(input_dim))
    layer = make_layer(impl, config, input_dim)
    block([variable.value for variable in layer.weights])
    release_memory()
    wait_for_rss_to_settle(*settle_polls)
    was_reset = reset_peak_rss()
    before_peak = peak_rss_mb()
    outputs = block(layer(ids))
    after_peak = peak_rss_mb()
    temporary_itemsize = CONFIGS[config][2]
    entry = {
        "impl": impl,
        "config": config,
        "input_dim": input_dim,
        "table_bytes": variable_bytes(layer),
        # The size of an input_dim x output_dim temporary in the dtype such a
        # temporary would have (see CONFIGS).
        "temporary_mb": input_dim * OUTPUT_DIM * temporary_itemsize / 2**20,
        "output_mb": float(np.prod(ops.shape(outputs)))
        * np.dtype(keras.backend.standardize_dtype(outputs.dtype)).itemsize
        / 2**20,
        "peak_before_mb": before_peak,
        "peak_after_mb": after_peak,
        "peak_increase_mb": after_peak - before_peak,
        "peak_was_reset": was_reset,
    }
    del layer, outputs
    release_memory()
    return entry

"""The layout of an Embedding layer's variables in a weights store.

`keras.layers.Embedding` stores one array, the table, under key "0" (with LoRA
it merges the adapters into the table first and drops them). This layer stores
the table alone when LoRA is off, so checkpoints cross with Keras both ways,
and with LoRA on it stores the unmerged table and the adapters, each in its own
dtype, so fine-tuning resumes exactly where it stopped:

    "0": embeddings          (input_dim, output_dim), the table's dtype
    "1": lora_embeddings_a   (input_dim, rank), float32
    "2": lora_embeddings_b   (rank, output_dim), float32
    "3": lora_alpha          (1,), float64
"""

import numpy as np

PLAIN_ENTRIES = 1
LORA_ENTRIES = 4


def read_entries(store, layer_name):
    """Returns the arrays of a store as numpy, checking their count."""
    count = len(store.keys())
    if count not in (PLAIN_ENTRIES, LORA_ENTRIES):
        raise ValueError(
            f"Layer '{layer_name}' cannot load a checkpoint entry with {count} "
            "arrays: an Embedding stores 1 (the table, as "
            "keras.layers.Embedding saves it) or 4 (the table, LoRA adapters "
            "a and b, and lora_alpha). The file was written by a different "
            "layer or model, or is corrupt."
        )
    return [np.asarray(store[str(i)]) for i in range(count)]


def check_shape(layer_name, what, array, expected, hint):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"Layer '{layer_name}' cannot load {what} of shape "
            f"{tuple(array.shape)} from the checkpoint: the layer expects "
            f"{tuple(expected)}. {hint}"
        )


def merged_table(table, lora_a, lora_b, lora_alpha):
    """The table with LoRA folded in, computed in float64 on the host."""
    rank = lora_a.shape[1]
    delta = (lora_alpha / rank) * (lora_a.astype("float64") @ lora_b.astype("float64"))
    return table.astype("float64") + delta

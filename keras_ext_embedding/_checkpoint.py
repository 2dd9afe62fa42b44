"""The layout of an Embedding layer's variables in a weights store.

The table's variables come first, in `keras.layers.Embedding`'s order, so
checkpoints without LoRA cross with Keras both ways:

    float table:    "0" embeddings (input_dim, output_dim)
    int8:           "0" embeddings int8 (input_dim, output_dim)
                    "1" embeddings_scale (input_dim,)
    int4, per row:  "0" embeddings int8, two values a byte
                        (input_dim, ceil(output_dim / 2))
                    "1" embeddings_scale (input_dim,)
    int4, grouped:  "0" embeddings, "1" embeddings_scale (input_dim, groups),
                    "2" embeddings_zero int8 (input_dim, groups),
                    "3" g_idx float32 (output_dim,)

With LoRA enabled, three entries follow the table's `n`: "n" lora_embeddings_a
(input_dim, rank) and "n+1" lora_embeddings_b (rank, output_dim), both
float32, and "n+2" lora_alpha (1,) float64. Keras merges the adapters into the
table before saving (and for a quantized table quantizes the merge again); this
layer keeps them apart, each in its own dtype, so fine-tuning resumes exactly
where it stopped.
"""

import warnings

import numpy as np

LORA_ENTRIES = 3
# Zero points hold integers in [-8, 7], exact in any dtype, and are read from
# int8 or float arrays: Keras 3.15 (and this layer) stores an untied reverse
# table's as float32, later Keras as int8.
ZERO_POINTS = ("embeddings_zero", "reverse_embeddings_zero")


def read_entries(store, layer_name, stored, description, shape_hint):
    """Returns the store's arrays as NumPy after checking them against the
    layer's `(name, variable)` pairs: their count (with or without LoRA), and
    each table array's dtype and shape (`shape_hint` says how to fix one)."""
    count = len(store.keys())
    entries = [np.asarray(store[str(i)]) for i in range(count)]
    names = ", ".join(name for name, _ in stored)
    if count not in (len(stored), len(stored) + LORA_ENTRIES):
        raise ValueError(
            f"Layer '{layer_name}' cannot load a checkpoint entry with {count} "
            f"arrays: the layer holds {description} and loads {len(stored)} "
            f"({names}), or {len(stored) + LORA_ENTRIES} with LoRA adapters "
            "after them (lora_embeddings_a, lora_embeddings_b, lora_alpha). "
            + _hint(entries, stored)
        )
    for (name, variable), array in zip(stored, entries, strict=False):
        expected_integer = np.dtype(str(variable.dtype)).kind == "i"
        if name not in ZERO_POINTS and (array.dtype.kind == "i") != expected_integer:
            raise ValueError(
                f"Layer '{layer_name}' cannot load {name} of dtype "
                f"{array.dtype} from the checkpoint: the layer holds "
                f"{description}, with {name} of dtype {variable.dtype}. "
                + _hint(entries, stored)
            )
        what = "the table" if len(stored) == 1 else name
        check_shape(layer_name, what, array, variable.shape, shape_hint)
    return entries


def split_named(store):
    """`(numbered, named)`: the store's entries "0", "1", ... (Keras's
    layout) and those saved under a name (row-sparse slots), as dicts."""
    keys = list(store.keys())
    numbered = {key: store[key] for key in keys if key.isdigit()}
    named = {key: store[key] for key in keys if not key.isdigit()}
    return numbered, named


def read_named(layer_name, named, stored):
    """The arrays of `stored` `(key, variable)` pairs found in `named`, in
    order, checked against their variables' shapes; None when the
    checkpoint holds none of them (saved without `optimizer=`)."""
    present = [key for key, _ in stored if key in named]
    if not present:
        return None
    if len(present) != len(stored):
        missing = [key for key, _ in stored if key not in named]
        warnings.warn(
            f"Layer '{layer_name}': the checkpoint holds {', '.join(present)} "
            f"but not {', '.join(missing)}: it was saved with another "
            "`optimizer`. The row-sparse optimizer state starts afresh.",
            stacklevel=2,
        )
        return None
    arrays = []
    for key, variable in stored:
        array = np.asarray(named[key])
        check_shape(
            layer_name,
            key,
            array,
            variable.shape,
            "The checkpoint belongs to a layer of another shape.",
        )
        arrays.append(array)
    return arrays


def _hint(entries, stored):
    """What the checkpoint probably holds, and how to load it."""
    file_quantized = bool(entries) and entries[0].dtype == np.int8
    layer_quantized = str(stored[0][1].dtype) == "int8"
    if file_quantized and not layer_quantized:
        return (
            "The checkpoint holds a quantized table: build the layer with the "
            "dtype policy it was saved with (e.g. dtype='int8_from_float32') "
            "or call `layer.quantize(...)` with the same mode and config "
            "before loading."
        )
    if layer_quantized and entries and not file_quantized:
        return (
            "The checkpoint holds a float table: load it into a layer that is "
            "not quantized, then call `layer.quantize(...)`."
        )
    if layer_quantized:
        return (
            "The checkpoint was quantized with another mode or int4 "
            "block_size: build the layer with the dtype policy and "
            "quantization_config it was saved with."
        )
    return "The file was written by a different layer or model, or is corrupt."


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

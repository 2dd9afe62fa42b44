"""The headline ratios, computed from the measured results.

`headline(results, settings)` returns, per backend, the few numbers the top
of `docs/benchmarks.md` quotes; `run.py` stores them in the JSON as well. A
number a run did not measure (a section or a mode left out) is None.
"""


def find(rows, **match):
    """The first row whose fields equal `match`, or None."""
    return next(
        (row for row in rows if all(row.get(k) == v for k, v in match.items())),
        None,
    )


def speedup(row):
    """Keras's time over ours (above 1: ours is faster)."""
    return None if row is None else 1 / row["ratio"]


def lora_speedups(scaling, input_dim):
    forward = [
        row
        for row in scaling
        if row["kind"] == "forward" and row["lora"] and row["input_dim"] == input_dim
    ]
    return {
        "forward": {row["mode"]: speedup(row) for row in forward},
        "train": speedup(find(scaling, kind="train", lora=True, input_dim=input_dim)),
    }


def native_ratios(floor, input_dim):
    return {
        row["mode"]: {
            "ours_over_native": row["ours_over_native"],
            "keras_over_native": row["keras_over_native"],
        }
        for row in floor
        if row["input_dim"] == input_dim
    }


def int4_table_ratio(table_bytes):
    """float32 table bytes over our int4 (groups of 128) layer's bytes."""
    row = find(table_bytes, config="int4 block 128")
    return None if row is None else row["float32_bytes"] / row["ours_bytes"]


def reverse_ratios(rows, input_dim):
    """One decoding step's reverse projection at `input_dim` rows, per mode:
    ours over the floor on the float table, and Keras's time over ours per
    format."""
    decode = [
        row
        for row in rows
        if row["hidden"] == "decode" and row["input_dim"] == input_dim
    ]
    modes = list(dict.fromkeys(row["mode"] for row in decode))
    float_rows = {row["mode"]: row for row in decode if row["format"] == "float32"}
    return {
        "float_over_floor": {
            mode: row["ours_over_floor"] for mode, row in float_rows.items()
        },
        "speedup": {
            mode: {row["format"]: speedup(row) for row in decode if row["mode"] == mode}
            for mode in modes
        },
    }


def decoding_speedups(rows):
    """Keras's time per generated token over ours, per format."""
    return {row["format"]: speedup(row) for row in rows}


def training_speedups(rows, input_dim):
    """Keras's dense Adam step time over the step of our row-sparse Adam
    (`optimizer="adam"`) at `input_dim` rows, per mode."""
    return {
        row["mode"]: 1 / row["over_keras"]["adam"]
        for row in rows
        if row["input_dim"] == input_dim
    }


def bags_ratios(forward, steps):
    """The bags section's ratios of medians, per mode: ours on dense ids over
    the best hand-written keras.ops and over keras-rs EmbedReduce, and
    EmbedReduce's dense Adam step time over ours with `optimizer="adam"`."""
    return {
        "over_hand_written": {
            row["mode"]: row["ratios"]["ours_over_hand_written"] for row in forward
        },
        "over_embed_reduce": {
            row["mode"]: row["ratios"]["ours_over_embed_reduce"] for row in forward
        },
        "train_speedup": {
            row["mode"]: row["ratios"]["embed_reduce_over_ours_adam"] for row in steps
        },
    }


def headline(results, settings):
    lora_size = settings["lora_case_size"]
    native_size = max(settings["native_sizes"])
    reverse_size = max(settings["reverse_sizes"])
    training_size = settings["training_case_size"]
    return {
        "lora_input_dim": lora_size,
        "native_input_dim": native_size,
        "quantized_input_dim": settings["quantized_size"],
        "reverse_input_dim": reverse_size,
        "decoding_vocab": settings["decoding_vocab"],
        "training_input_dim": training_size,
        "bags_input_dim": settings.get("bags_size"),
        "backends": {
            backend: {
                "lora_speedup": lora_speedups(
                    result.get("vocab_scaling", []), lora_size
                ),
                "native": native_ratios(result.get("native_floor", []), native_size),
                "int4_table_ratio": int4_table_ratio(result.get("table_bytes", [])),
                "reverse": reverse_ratios(
                    result.get("reverse_projection", []), reverse_size
                ),
                "decoding_speedup": decoding_speedups(result.get("decoding", [])),
                "training_speedup": training_speedups(
                    result.get("training", []), training_size
                ),
                "bags": bags_ratios(
                    result.get("bags", []), result.get("bags_training", [])
                ),
            }
            for backend, result in results.items()
        },
    }

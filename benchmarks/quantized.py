"""int8 and int4 lookups, and LoRA on quantized tables, against Keras's.

Both layers are quantized alike from the same float table with
`quantize(mode, config=...)`. Keras's int4 call unpacks the whole table
before its gather; ours gathers the packed rows and unpacks those.
"""

from keras import ops
from layers import check_same, compare_forwards, quantized_pair, variable_bytes
from plan import AS_FAST_AS_KERAS, LORA_RANK, OUTPUT_DIM
from timing import make_ids, release_memory

# (label, mode, Int4QuantizationConfig block_size): Keras's int8, its int4
# with one scale per row, and its default int4 (groups of 128).
QUANTIZED_CONFIGS = [
    ("int8", "int8", None),
    ("int4 per row", "int4", None),
    ("int4 block 128", "int4", 128),
]


def lookup_target(mode, ratio):
    """int8 must cost at most Keras's time (`AS_FAST_AS_KERAS`); int4 must
    be >= 20x faster."""
    if mode == "int8":
        return f"ratio <= {AS_FAST_AS_KERAS}", ratio <= AS_FAST_AS_KERAS
    return "speedup >= 20x at 1M rows", 1 / ratio >= 20


def lora_target(result):
    """LoRA on our quantized tables (int8, and int4, which reads half the
    bytes) must cost at most Keras's time on int8."""
    return f"ratio <= {AS_FAST_AS_KERAS}", result["ratio"] <= AS_FAST_AS_KERAS


def no_target(result):
    return "none (for information)", None


def report_timings(report, case, input_dim, timings, target_of):
    """Reports each `(mode, result)` of compare_forwards as a speed row;
    `target_of(result)` gives its `(target, met)`."""
    for mode, result in timings:
        target, met = target_of(result)
        report(
            case=case,
            mode=mode,
            variant="raise",
            input_dim=input_dim,
            target=target,
            met=met,
            **result,
        )


def bench_lookups(plan, report, table_report):
    """int8 and int4 lookups against Keras's, and the bytes of each table."""
    input_dim = plan["quantized_size"]
    ids = ops.convert_to_tensor(make_ids(input_dim))
    float_bytes = input_dim * OUTPUT_DIM * 4
    for label, mode, block_size in QUANTIZED_CONFIGS:
        ours, theirs = quantized_pair(input_dim, mode, block_size)
        check_same(ours, theirs, ids)
        table_report(
            config=label,
            input_dim=input_dim,
            ours_bytes=variable_bytes(ours),
            keras_bytes=variable_bytes(theirs),
            float32_bytes=float_bytes,
        )
        timings = compare_forwards(
            ours, theirs, ids, plan["quantized_reps"], 2, settle=mode == "int4"
        )
        report_timings(
            report,
            f"{label} lookup",
            input_dim,
            timings,
            lambda result, mode=mode: lookup_target(mode, result["ratio"]),
        )
        del ours, theirs
        release_memory()


def bench_lora(plan, report):
    """LoRA on our int8 and int4 tables against LoRA on Keras's int8 (and,
    for information, Keras's int4)."""
    input_dim = plan["quantized_size"]
    ids = ops.convert_to_tensor(make_ids(input_dim))
    ours_int8, keras_int8 = quantized_pair(input_dim, "int8", None, LORA_RANK)
    check_same(ours_int8, keras_int8, ids)
    ours_int4, keras_int4 = quantized_pair(input_dim, "int4", 128, LORA_RANK)
    check_same(ours_int4, keras_int4, ids)
    cases = [
        ("int8 LoRA", ours_int8, keras_int8, "vs keras int8 LoRA"),
        ("int4 LoRA", ours_int4, keras_int8, "vs keras int8 LoRA"),
        ("int4 LoRA", ours_int4, keras_int4, "vs keras int4 LoRA"),
    ]
    for label, ours, theirs, against in cases:
        timings = compare_forwards(
            ours, theirs, ids, plan["quantized_reps"], 2, settle=True
        )
        report_timings(
            report,
            f"{label} forward {against}",
            input_dim,
            timings,
            lora_target if "int8" in against else no_target,
        )


def bench(plan, report, table_report):
    bench_lookups(plan, report, table_report)
    bench_lora(plan, report)

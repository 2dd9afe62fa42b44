"""Forward and training-step time against the vocabulary size.

For each size, with and without LoRA (rank 8, non-zero `B`): the forward
pass (eager and the backend's compiled call) and one `train_on_batch` of
`Input -> Embedding -> GlobalAveragePooling1D`, ours against Keras's. One
size is built at a time and freed before the next: a 4M x 128 float32 table
is 2 GiB, and both layers hold one.

The speed table's `lora_forward` and `lora_train` cases are the
`plan["lora_case_size"]` point with LoRA.
"""

from keras import ops
from layers import (
    TRAIN_MODE,
    build_pair,
    check_same,
    compare_forwards,
    compare_train_steps,
)
from plan import LORA_RANK
from timing import make_ids, release_memory


def warmup_for(input_dim):
    # One untimed call is enough where a call takes a second or more.
    return 1 if input_dim >= 1_000_000 else 2


def measure_size(plan, input_dim, lora, report):
    reps = plan["scaling_reps"][input_dim]
    warmup = warmup_for(input_dim)
    settle = input_dim >= plan["settle_from"]
    ids = ops.convert_to_tensor(make_ids(input_dim))
    ours, theirs = build_pair(input_dim, lora_rank=LORA_RANK if lora else None)
    check_same(ours, theirs, ids)
    for mode, result in compare_forwards(ours, theirs, ids, reps, warmup, settle):
        report(kind="forward", input_dim=input_dim, lora=lora, mode=mode, **result)
    # Training last: it changes the weights.
    result = compare_train_steps(ours, theirs, ids, reps, warmup, settle)
    report(kind="train", input_dim=input_dim, lora=lora, mode=TRAIN_MODE, **result)
    del ours, theirs
    release_memory()


def bench(plan, report):
    for input_dim in plan["scaling_sizes"]:
        for lora in (False, True):
            measure_size(plan, input_dim, lora, report)


def lora_case_rows(plan, scaling_rows):
    """The speed table's `lora_forward` and `lora_train` rows."""
    for row in scaling_rows:
        if not row["lora"] or row["input_dim"] != plan["lora_case_size"]:
            continue
        if row["kind"] == "forward":
            case, target, speedup = "lora_forward", "speedup >= 50x at 1M rows", 50
        else:
            case, target, speedup = "lora_train", "speedup >= 10x at 1M rows", 10
        yield {
            "case": case,
            "mode": row["mode"],
            "variant": "raise",
            "input_dim": row["input_dim"],
            "target": target,
            "met": 1 / row["ratio"] >= speedup,
            "ours": row["ours"],
            "keras": row["keras"],
            "ratio": row["ratio"],
        }

"""What the benchmarks measure: sizes, repetitions and memory configurations.

Shared by `run.py` (which starts the processes and writes the report) and
`bench_backend.py` (which measures); plain data, so that `run.py` never
imports a backend. A full run (`make bench`) uses `FULL`; `--quick` uses
`QUICK`, the same sections at tiny sizes with a few repetitions, to check
that everything runs.
"""

# Every case looks up a `64 x 32` batch of int32 ids in a table of
# `output_dim=128`; LoRA is rank 8.
BATCH_SHAPE = (64, 32)
OUTPUT_DIM = 128
LORA_RANK = 8

# The sections of a run, in the order a backend process measures them.
SECTIONS = ("native_floor", "quantized", "vocab_scaling", "memory")

# Peak-memory configurations: (name, label). The layer each one builds is in
# peak_memory.py.
MEMORY_CONFIGS = (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("int8", "int8"),
    ("int4", "int4 (groups of 128)"),
    ("float32_lora", "float32 + LoRA"),
    ("int4_lora", "int4 + LoRA"),
)

FULL = {
    # Plain lookups against the backend's own gather. The lookup case of the
    # speed table (ours against Keras, `invalid_ids` raise and zeros) is the
    # `lookup_size` point of this section.
    "native_sizes": (100_000, 1_000_000),
    "native_reps": {100_000: 300, 1_000_000: 100},
    "native_warmup": 5,
    "lookup_size": 100_000,
    # torch.compile calls are slower and vary more; fewer repetitions.
    "torch_compile_sizes": (100_000, 1_000_000),
    "torch_compile_reps": 30,
    # int8 / int4 lookups and LoRA on quantized tables.
    "quantized_size": 1_000_000,
    "quantized_reps": 30,
    # Forward and training-step time against the vocabulary size. The
    # lora_forward and lora_train cases of the speed table are the
    # `lora_case_size` point with LoRA. A 4M x 128 float32 table is 2 GiB
    # (4 GiB for both layers), and Keras's LoRA call takes seconds there:
    # few repetitions at the large sizes.
    "scaling_sizes": (10_000, 100_000, 1_000_000, 4_000_000),
    "scaling_reps": {10_000: 30, 100_000: 30, 1_000_000: 15, 4_000_000: 5},
    "lora_case_size": 1_000_000,
    # From this size on, each timed call follows an untimed one (see
    # timing.compare): a Keras call there leaves gigabytes to free.
    "settle_from": 1_000_000,
    # Peak memory of one forward pass: one fresh process per backend,
    # configuration and layer.
    "memory_size": 1_000_000,
    "memory_in_timing_process": False,
    # Before measuring, the resident set size must stay put for 4 polls
    # 0.25 s apart (see peak_memory.wait_for_rss_to_settle).
    "memory_settle_polls": (0.25, 4),
}

QUICK = {
    "native_sizes": (1_000, 10_000),
    "native_reps": {1_000: 3, 10_000: 3},
    "native_warmup": 1,
    "lookup_size": 10_000,
    # Each torch.compile of a layer takes seconds: one size only.
    "torch_compile_sizes": (10_000,),
    "torch_compile_reps": 3,
    "quantized_size": 10_000,
    "quantized_reps": 3,
    "scaling_sizes": (1_000, 10_000, 100_000),
    "scaling_reps": {1_000: 3, 10_000: 3, 100_000: 3},
    "lora_case_size": 100_000,
    "settle_from": 100_000,
    # The timing process measures every configuration in turn at the end:
    # no process to start, but memory freed before can serve a later
    # measurement's temporaries unseen, so quick peaks mean little. The size
    # of the first-call setup layer, so that its compiled kernels serve.
    "memory_size": 1_000,
    "memory_in_timing_process": True,
    "memory_settle_polls": (0.05, 2),
}


def plan(quick):
    return QUICK if quick else FULL

"""The Markdown page of a benchmark run (`docs/benchmarks.md` for `make bench`).

`markdown(data, images)` renders the JSON document `run.py` writes, and the
figures `plots.write_all` drew, as one MkDocs page: a headline of the key
ratios and the machine, the tables and figures of each section, then how it
is measured and the runs the numbers come from. Its tables fit a window
1,280 px wide (`FRONT_MATTER` gives them the page's width): a table wider
than its column scrolls, hiding its last columns.
Links stay inside the output directory (the figures in `img/`, the JSON
beside the page): MkDocs's strict mode rejects links outside `docs/`.
"""

import re
import unicodedata

from labels import (
    BACKEND_TITLES,
    BAGS_COLUMNS,
    BAGS_MEMORY_LABELS,
    BAGS_RATIO_COLUMNS,
    BAGS_TRAIN_COLUMNS,
    DECODING_LABELS,
    LOOKUP_CALL_LABELS,
    LOOKUP_LAYER_LABELS,
    MEMORY_LABELS,
    REVERSE_LABELS,
    SHARDED_COLUMNS,
    SHARDED_LABELS,
    TRAINING_COLUMNS,
    native_op,
    rows_label,
)
from plan import AS_FAST_AS_KERAS

# Below half the size of a table-sized temporary, a peak increase shows
# none was made.
TEMPORARY_FRACTION = 0.5


def table(header, align, rows):
    """A Markdown table: `header` cells, `align` ("l" or "r" per column)."""
    rule = "|".join("---:" if a == "r" else "---" for a in align)
    lines = [f"| {' | '.join(header)} |", f"|{rule}|"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    return "\n".join(lines)


def number(value, unit=""):
    """Three significant digits, at most; "-" for a missing value."""
    if value is None:
        return "-"
    digits = 3 if value < 1 else 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f}{unit}"


def milliseconds(summary):
    digits = number(summary["median_ms"])
    places = len(digits.split(".")[1]) if "." in digits else 0
    return f"{digits} ± {summary['iqr_ms'] / 2:.{places}f}"


def verdict(met):
    return "n/a" if met is None else "yes" if met else "**no**"


def backend_rows(data, section):
    """`(backend, row)` for every row of `section`, backend by backend."""
    for backend, result in data["results"].items():
        for row in result.get(section, []):
            yield backend, row


def headline_section(data):
    summary = data["headline"]
    backends = summary["backends"]

    def line(label, value):
        """A row: `label`, then `value(headline of backend)` per backend."""
        return [label, *(value(backends[backend]) for backend in backends)]

    def compiled(ratios):
        modes = [mode for mode in ratios if mode != "eager"]
        return " / ".join(number(ratios[mode], "x") for mode in modes) or "-"

    def compiled_all(ratios):
        return " / ".join(number(ratio, "x") for ratio in ratios.values()) or "-"

    def native(field, compiled_modes):
        def cell(entry):
            modes = [m for m in entry["native"] if (m != "eager") == compiled_modes]
            return " / ".join(number(entry["native"][m][field]) for m in modes) or "-"

        return cell

    lora = f"{summary['lora_input_dim']:,} rows"
    floor = f"plain lookup, {summary['native_input_dim']:,} rows"
    quantized = f"{summary['quantized_input_dim']:,} rows"
    reverse_size = summary.get("reverse_input_dim")
    reverse = f"reverse projection, {reverse_size or 0:,} rows, 8 tokens, eager"

    def reverse_speedup(name):
        def cell(entry):
            eager = entry.get("reverse", {}).get("speedup", {}).get("eager", {})
            return number(eager.get(name), "x")

        return cell

    def reverse_floor(entry):
        ratios = entry.get("reverse", {}).get("float_over_floor", {})
        return number(ratios.get("eager"))

    def decoding(entry):
        speedups = entry.get("decoding_speedup", {})
        return " / ".join(number(speedups.get(name), "x") for name in DECODING_LABELS)

    rows = [
        line(
            f"LoRA forward, {lora}, eager: Keras time / ours",
            lambda b: number(b["lora_speedup"]["forward"].get("eager"), "x"),
        ),
        line(
            f"LoRA forward, {lora}, compiled: Keras time / ours",
            lambda b: compiled(b["lora_speedup"]["forward"]),
        ),
        line(
            f"LoRA training step, {lora}: Keras time / ours",
            lambda b: number(b["lora_speedup"]["train"], "x"),
        ),
        line(f"{floor}, eager: ours / native op", native("ours_over_native", False)),
        line(f"{floor}, compiled: ours / native op", native("ours_over_native", True)),
        line(f"{floor}, eager: Keras / native op", native("keras_over_native", False)),
        line(
            f"{floor}, compiled: Keras / native op", native("keras_over_native", True)
        ),
        line(
            f"int4 table (groups of 128), {quantized}: float32 bytes / int4 bytes",
            lambda b: number(b["int4_table_ratio"], "x"),
        ),
    ]
    if reverse_size:
        rows += [
            line(f"{reverse} (float32): ours / matmul floor", reverse_floor),
            *(
                line(
                    f"{reverse} ({REVERSE_LABELS[name]}): Keras time / ours",
                    reverse_speedup(name),
                )
                for name in ("float32_lora", "int8", "int4_128")
            ),
            line(
                f"greedy decoding, vocabulary {summary['decoding_vocab']:,}: "
                "Keras time / ours per token, " + " / ".join(DECODING_LABELS.values()),
                decoding,
            ),
        ]
    training_size = summary.get("training_input_dim")
    if training_size:
        rows.append(
            line(
                f"training step, {training_size:,} rows: Keras dense Adam time / "
                "ours `optimizer='adam'`",
                lambda b: compiled_all(b.get("training_speedup", {})),
            )
        )
    bags_size = summary.get("bags_input_dim")
    if bags_size:
        bags = f"bags (1,024 bags of 1 to 50 ids), {bags_size:,} rows"

        def bags_cell(field):
            def cell(entry):
                return compiled_all(entry.get("bags", {}).get(field, {}))

            return cell

        rows += [
            line(
                f"{bags}, forward, every mode: ours / best hand-written keras.ops",
                bags_cell("over_hand_written"),
            ),
            line(
                f"{bags}, forward, every mode: ours / keras-rs EmbedReduce",
                bags_cell("over_embed_reduce"),
            ),
            line(
                f"{bags}, training step: EmbedReduce dense Adam time / ours "
                "`optimizer='adam'`",
                bags_cell("train_speedup"),
            ),
        ]
    training_note = ""
    if training_size:
        training_note = """ The training row is one `train_on_batch` of
`Embedding -> GlobalAveragePooling1D -> Dense(1)`, the Dense layer trained
by the model's Adam in both (TensorFlow: `jit_compile=False` / `True`)."""
    if bags_size:
        training_note += """ The bags rows list every mode, eager first
(TensorFlow: eager / `tf.function` / XLA; JAX: eager / `jax.jit`; the
training step: TensorFlow `jit_compile=False` / `True`); "ours" there is
`EmbeddingBag` on dense padded ids (see "Bags of ids")."""
    header = ["", *(BACKEND_TITLES[b] for b in backends)]
    slower = slower_than_keras(data)
    return f"""## Headline

Medians of this run; `64 x 32` ids, `output_dim=128`, LoRA rank 8.
"Compiled" lists each compiled mode of the backend in the order of the
tables below (`tf.function` / `tf.function` with XLA; `jax.jit`;
`torch.compile`). "Native op" is the backend's own gather on the same table
(`tf.gather`, `jnp.take`, `torch.nn.functional.embedding`), the floor of any
layer: 1.0 means no overhead. The reverse-projection rows are of a tied
`ReversibleEmbedding` of `output_dim=512` on the hidden states of one
decoding step (`8 x 512`); their floor is the table-first `keras.ops.matmul`
of the float32 table with the hidden states.{training_note}

{table(header, "l" * len(header), rows)}

{slower}"""


def slower_than_keras(data):
    """Every measured cell where ours took more than `AS_FAST_AS_KERAS`
    times Keras's layer (a drop-in slower than what it replaces), listed
    whether or not its row has a target: the speed table, the reverse
    projection and greedy decoding."""
    cells = []
    for backend, row in backend_rows(data, "speed"):
        case = f"{row['case']} ({row['input_dim']:,} rows)"
        cells.append((backend, case, row["mode"], row["variant"], row["ratio"]))
    for backend, row in backend_rows(data, "reverse_projection"):
        case = (
            f"reverse projection, {REVERSE_LABELS.get(row['format'], row['format'])}"
            f" ({row['input_dim']:,} rows, {row['hidden']})"
        )
        cells.append((backend, case, row["mode"], None, row["ratio"]))
    for backend, row in backend_rows(data, "decoding"):
        case = (
            f"greedy decoding, {DECODING_LABELS.get(row['format'], row['format'])}"
            f" (vocabulary {row['vocab']:,})"
        )
        cells.append((backend, case, "generate", None, row["ratio"]))
    slow = [cell for cell in cells if cell[-1] > AS_FAST_AS_KERAS]
    intro = (
        f"Cells slower than Keras's layer (ours / Keras time above "
        f"{AS_FAST_AS_KERAS}, of {len(cells)} compared):"
    )
    if not slow:
        return f"{intro} none."
    rows = [
        [
            BACKEND_TITLES[backend],
            case,
            mode,
            "" if variant is None else f"invalid_ids={variant!r}",
            f"{ratio:.2f}",
        ]
        for backend, case, mode, variant, ratio in slow
    ]
    header = ["backend", "case", "mode", "ours", "ours/keras"]
    return f"{intro}\n\n{table(header, 'llllr', rows)}"


def ratio_cell(ratio):
    """`ours/keras (keras/ours)`: the ratio targets are set on, then the
    speedup, which stays readable where the ratio rounds to 0.00."""
    return f"{ratio:.2f} ({number(1 / ratio, 'x')})"


def speed_case(row):
    """The case, its size, and the configuration of ours where it is not the
    default `invalid_ids="raise"`."""
    case = f"{row['case']}, {row['input_dim']:,} rows"
    if row["variant"] != "raise":
        case += f", `invalid_ids={row['variant']!r}`"
    return case


def speed_tables(data):
    """One table per target, which the line above it states: a target
    column would repeat it on every row."""
    groups = {}
    for backend, row in backend_rows(data, "speed"):
        groups.setdefault(row["target"], []).append((backend, row))
    parts = []
    for target, rows in groups.items():
        judged = any(row["met"] is not None for _, row in rows)
        cells = [
            [
                backend,
                speed_case(row),
                row["mode"],
                row["ours"]["reps"],
                milliseconds(row["ours"]),
                milliseconds(row["keras"]),
                ratio_cell(row["ratio"]),
                *([verdict(row["met"])] if judged else []),
            ]
            for backend, row in rows
        ]
        header = ["backend", "case", "mode", "reps", "ours (ms)", "keras (ms)"]
        header += ["ours/keras (keras/ours)", *(["met"] if judged else [])]
        lead = (
            "**For information** (no target):"
            if target.startswith("none")
            else f"**Target: {target}**"
        )
        align = "lllrrrr" + "l" * judged
        parts.append(f"{lead}\n\n{table(header, align, cells)}")
    return "\n\n".join(parts)


def scaling_table(data):
    rows = [
        [
            backend,
            f"{row['input_dim']:,}",
            "yes" if row["lora"] else "no",
            row["kind"],
            row["mode"],
            row["ours"]["reps"],
            milliseconds(row["ours"]),
            milliseconds(row["keras"]),
            number(1 / row["ratio"], "x"),
        ]
        for backend, row in backend_rows(data, "vocab_scaling")
    ]
    header = ["backend", "rows", "LoRA", "pass", "mode", "reps"]
    header += ["ours (ms)", "keras (ms)", "keras/ours"]
    return table(header, "lrlllrrrr", rows)


def over_native(summary, ratio):
    """`median ± IQR/2 (time over the native op's)`."""
    return f"{milliseconds(summary)} ({number(ratio)})"


def native_table(data):
    rows = [
        [
            backend,
            f"{row['input_dim']:,}",
            row["mode"],
            row["native"]["reps"],
            milliseconds(row["native"]),
            over_native(row["ours"], row["ours_over_native"]),
            over_native(row["ours_zeros"], row["ours_zeros_over_native"]),
            over_native(row["keras"], row["keras_over_native"]),
        ]
        for backend, row in backend_rows(data, "native_floor")
    ]
    header = ["backend", "rows", "mode", "reps", "native (ms)", "ours (ms)"]
    header += ["ours zeros (ms)", "keras (ms)"]
    return table(header, "lrlrrrrr", rows)


def native_ops(data):
    """The native op of each mode (of each backend, eager), as
    `mode: op, op; mode: op`."""
    modes = {}
    for backend, row in backend_rows(data, "native_floor"):
        ops = modes.setdefault(row["mode"], {})
        ops[native_op(backend, row["mode"])] = None
    return "; ".join(f"{mode}: {', '.join(ops)}" for mode, ops in modes.items())


def table_bytes_table(data):
    targets = {"int8": 3.8, "int4 per row": 7.4, "int4 block 128": 7.4}
    rows = []
    for backend, row in backend_rows(data, "table_bytes"):
        smaller = row["float32_bytes"] / row["ours_bytes"]
        target = targets[row["config"]]
        rows.append(
            [
                backend,
                row["config"],
                f"{row['input_dim']:,}",
                f"{row['ours_bytes'] / 2**20:.1f}",
                f"{row['keras_bytes'] / 2**20:.1f}",
                f"{row['float32_bytes'] / 2**20:.1f}",
                f"{smaller:.2f}x",
                f">= {target}x",
                verdict(smaller >= target),
            ]
        )
    header = ["backend", "table", "input_dim", "ours (MiB)", "keras (MiB)"]
    header += ["float32 (MiB)", "float32/ours", "target", "met"]
    return table(header, "llrrrrrll", rows)


def has_temporary(entry):
    return entry["peak_increase_mb"] >= entry["temporary_mb"] * TEMPORARY_FRACTION


def memory_table(data):
    rows = [
        [
            backend,
            MEMORY_LABELS[entry["config"]],
            entry["impl"],
            f"{entry['table_bytes'] / 2**20:.1f}",
            f"{entry['peak_increase_mb']:.1f}",
            number(entry["temporary_mb"]),
            f"{entry['output_mb']:.1f}",
            "yes" if has_temporary(entry) else "no",
        ]
        for backend, entry in backend_rows(data, "memory")
    ]
    header = ["backend", "configuration", "layer", "table (MiB)"]
    header += ["peak RSS increase (MiB)", "a table-sized temporary (MiB)"]
    header += ["output (MiB)", "table-sized temporary"]
    return table(header, "lllrrrrl", rows)


def memory_verdict(data):
    """Ours must add no table-sized temporary. Keras's rows are for
    comparison: an allocator that serves a temporary from memory it already
    holds (as TensorFlow's does) hides it from the resident set size."""
    ours = [e for _, e in backend_rows(data, "memory") if e["impl"] == "ours"]
    if not ours:
        return "not measured"
    return "**not met**" if any(map(has_temporary, ours)) else "met"


def figure(images, name):
    if name not in images:
        return "*Figure not drawn: this run did not measure its section.*"
    file_name, alt = images[name]
    # A link to the image itself: a narrower window shrinks it, the link
    # shows it whole.
    return f"[![{alt}](img/{file_name})](img/{file_name})"


def machine_section(data):
    info = data["machine"]
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    updates = data.get("updates", [])
    dates = f"{info['date']}, in {data['duration_s'] / 60:.1f} minutes"
    if updates:
        dates += (
            f"; {len(updates)} later runs measured some sections again, the "
            f"last on {updates[-1]['date']} ([run history](#run-history))"
        )
    return f"""## Machine

- CPU: {info["cpu"]}, {info["cores"]} cores; RAM {info["ram_gib"]:.0f} GiB;
  {info["os"]}; no GPU used.
- Versions: {versions}.
- Measured: {dates}.{other_machine(data)}

The machine is shared with other jobs and has only {info["cores"]} cores, so
single timings are noisy, at times by a factor of two. Every number below is
a **median** over repetitions (`reps`), shown as `median ± IQR/2` (half the
interquartile range). Each repetition times the compared implementations
back to back, rotating which goes first, so that load from other processes
hits them alike; ratios of medians are steadier than the absolute times.
Differences within about 10% are within the noise of this machine."""


def update_machine(data, update):
    """Where an update ran on another CPU than the run it updates: which
    (its figures and the rest of the page's compare across machines)."""
    machine = data["machine"]
    cpu, cores = update.get("cpu"), update.get("cores")
    if cpu is None or (cpu, cores) == (machine["cpu"], machine["cores"]):
        return ""
    return (
        f", on another machine: {cpu}, {cores} cores (compare its figures "
        "with each other, not with the rest of the page's)"
    )


def other_machine(data):
    """A line of the machine's list where an update ran on another CPU: the
    sections and backends whose figures are still from there (no later run
    on this machine measured them again), or that none are."""
    updates = data.get("updates", [])
    left = []
    for index, update in enumerate(updates):
        if not update_machine(data, update):
            continue
        again = {
            (section, backend)
            for later in updates[index + 1 :]
            if not update_machine(data, later)
            for section in later["sections"]
            for backend in later["backends"]
        }
        pairs = [
            (section, backend)
            for section in update["sections"]
            for backend in update["backends"]
            if (section, backend) not in again
        ]
        if pairs:
            measured = ", ".join(
                f"{section} on {backend}" for section, backend in pairs
            )
            left.append(f"{measured} ({update['cpu']}, {update['date']})")
    if left:
        return (
            "\n- Measured on another machine, to compare with each other only: "
            + "; ".join(left)
            + "."
        )
    if any(update_machine(data, update) for update in updates):
        return (
            "\n- Every figure is from this machine: the sections that runs on "
            "another machine measured were all measured here again later."
        )
    return ""


def intro(data):
    quick = ""
    if data["quick"]:
        quick = (
            "\n\n**This is a `--quick` smoke run**: tiny sizes and 3 repetitions, "
            "to check that everything runs. Its numbers mean little."
        )
    return f"""# Benchmarks

The layers of `keras_ext_embedding` against Keras's own
(`keras.layers.Embedding`, `keras.layers.ReversibleEmbedding`), keras-rs
`EmbedReduce` and each backend's own ops, on TensorFlow, JAX and PyTorch, on
a CPU. Generated by `make bench` (`python benchmarks/run.py`): do not edit by
hand, rerun it to refresh the numbers. Every number is also in
[benchmarks.json](benchmarks.json).{quick}"""


def history_section(data):
    """The run that wrote the JSON, then every `--update` of it, each with
    its command: last on the page, which the headline opens."""
    first = (
        f"- `{data['command']}` on {data['machine']['date']}, in "
        f"{data['duration_s'] / 60:.1f} minutes: the first run."
    )
    updates = "".join(
        f"\n- `{update['command']}` on {update['date']} measured "
        f"{', '.join(update['sections'])} again on {', '.join(update['backends'])} "
        f"({update['duration_s'] / 60:.1f} minutes){update_machine(data, update)}."
        for update in data.get("updates", [])
    )
    return f"""## Run history

The runs this page's numbers come from, in order; each `--update` replaced
the sections it measured, on the backends it ran.

{first}{updates}"""


def speed_sections(data, images):
    sizes = ", ".join(f"{size:,}" for size in data["settings"]["scaling_sizes"])
    return f"""## Speed against Keras

`ours/keras` below 1 means ours is faster; in parentheses, `keras/ours`, the
speedup. Ours runs in its default configuration, `invalid_ids="raise"`,
unless the case names another. The `lookup` rows come from the plain-lookup
measurements below, the `lora_forward` and `lora_train` rows from the
vocabulary-scaling ones.

{speed_tables(data)}

## Scaling with the vocabulary size

Forward pass and one training step of ours and Keras's layer, without and
with LoRA, at {sizes} rows. Keras's LoRA call
rebuilds the whole `input_dim x output_dim` table, so its time grows with the
vocabulary; ours gathers the looked-up rows only. The compiled panels show
Keras's default compiled call: `tf.function` without XLA on TensorFlow (XLA
is in the table), `jax.jit` on JAX; PyTorch has no compiled panel (Keras does
not compile there by default).

{figure(images, "vocab_scaling_forward")}

{figure(images, "vocab_scaling_train")}

{scaling_table(data)}

## Plain lookup against the backend's own op

The backend's gather on the same table and ids, outputs checked equal, is
the floor: `ours/native` of 1.0 means the layer adds nothing. The layers pay
for Keras's `Layer.__call__` (dtype policy, masking, name scopes) in eager
mode, and ours checks the ids (`invalid_ids="raise"`) or masks invalid ones
(`"zeros"`); compiled, that bookkeeping is traced away.

{figure(images, "native_floor")}

The native op, mode by mode: {native_ops(data)}. "ours" is
`invalid_ids="raise"`, "ours zeros" `invalid_ids="zeros"`; in parentheses,
each layer's time over the native op's (`ours/native`, `ours zeros/native`,
`keras/native`).

{native_table(data)}"""


def training_cell(row, name):
    """`median ± IQR/2 (Keras's time over this one)` of a variant."""
    if name not in row:
        return "-"
    if name == "keras":
        return milliseconds(row[name])
    return f"{milliseconds(row[name])} ({number(1 / row['over_keras'][name], 'x')})"


def step_mode(mode):
    """`jax.jit` of `train_on_batch (jax.jit)`: the sections say that every
    step is a `train_on_batch`."""
    prefix = "train_on_batch ("
    return mode[len(prefix) : -1] if mode.startswith(prefix) else mode


# The training table's variants in two tables, each with its one-pass floor:
# the table trained densely by the model's Adam, and row by row.
DENSE_STEPS = ("keras", "dense", "lora")
ROW_STEPS = ("sgd", "adagrad", "adam", "lora_adam", "native")
FLOORS = {"dense_adam": "dense Adam", "row_sparse_adam": "row-sparse Adam"}


def training_table(rows, variants, floor, reps):
    """One backend's steps of `variants`: each one's time and, in
    parentheses, Keras's dense Adam time over it; then the one-pass floor."""
    names = [name for name in variants if any(name in row for row in rows)]
    cells = [
        [
            f"{row['input_dim']:,}",
            step_mode(row["mode"]),
            *([row["keras"]["reps"]] if reps else []),
            *(training_cell(row, name) for name in names),
            number(row["floor_ms"][floor]),
        ]
        for row in rows
    ]
    header = ["rows", "mode", *(["reps"] if reps else [])]
    header += [f"{TRAINING_COLUMNS[n]} (ms)" for n in names]
    header += [f"one pass: {FLOORS[floor]} (ms)"]
    return table(header, "rl" + "r" * (reps + len(names) + 1), cells)


def training_tables(data):
    parts = []
    for backend, result in data["results"].items():
        rows = result.get("training", [])
        if rows:
            dense = training_table(rows, DENSE_STEPS, "dense_adam", reps=True)
            sparse = training_table(rows, ROW_STEPS, "row_sparse_adam", reps=False)
            native = ""
            if any("native" in row for row in rows):
                native = f", and {TRAINING_COLUMNS['native']}"
            parts.append(
                f"""### {BACKEND_TITLES[backend]}

Trained densely by the model's Adam:

{dense}

Trained row by row (`optimizer=`){native}, with the same repetitions:

{sparse}"""
            )
    return "\n\n".join(parts)


def physical_limit(data):
    """The one-pass floor in words, at the headline's size (or the largest
    measured), from the first backend that measured it."""
    rows = list(backend_rows(data, "training"))
    if not rows:
        return ""
    sizes = {row["input_dim"] for _, row in rows}
    size = data["settings"].get("training_case_size")
    size = size if size in sizes else max(sizes)
    backend, row = next((b, r) for b, r in rows if r["input_dim"] == size)
    unique = row["unique_ids"]
    floor = row["floor_ms"]
    return f"""The floor of a step is one pass over the bytes it must read and
write, at the memory bandwidth a NumPy copy reaches in the same process
(the "one pass" columns). At {size:,} rows a dense Adam step reads and
writes the table and both moments, `6 x {size:,} x 128 x 4` bytes =
{number(6 * size * 128 * 4 / 1e9)} GB: {number(floor["dense_adam"])} ms at
the {number(row["bandwidth_gb_s"])} GB/s of the {BACKEND_TITLES[backend]}
process. A row-sparse Adam step must touch only the batch's {unique:,}
distinct rows of them, `6 x {unique:,} x 128 x 4` bytes =
{number(6 * unique * 128 * 4 / 1e6)} MB: {number(floor["row_sparse_adam"])}
ms, whatever the vocabulary. Above that, a row-sparse step pays the model's
and the framework's per-step cost (the same at every size) and, on
TensorFlow without XLA and on PyTorch, the copies above."""


def lookup_after_table(data):
    rows = [
        [
            backend,
            f"{row['input_dim']:,}",
            LOOKUP_LAYER_LABELS[row["variant"]],
            LOOKUP_CALL_LABELS[row["call"]],
            row["before"]["reps"],
            milliseconds(row["before"]),
            milliseconds(row["after"]),
            number(row["slowdown"], "x"),
        ]
        for backend, row in backend_rows(data, "lookup_after_training")
    ]
    header = ["backend", "rows", "layer", "call", "reps", "before (ms)"]
    header += ["after one step (ms)", "after/before"]
    return table(header, "lrllrrrr", rows)


def training_sections(data, images):
    rows = [row for _, row in backend_rows(data, "training")]
    lookups = [row for _, row in backend_rows(data, "lookup_after_training")]
    sizes = ", ".join(f"{s:,}" for s in data["settings"].get("training_sizes", ()))
    size = f"{lookups[0]['input_dim']:,}" if lookups else "-"
    tables = not_measured(rows, "training") or training_tables(data)
    lookup_table = not_measured(lookups, "training") or lookup_after_table(data)
    return f"""## Training big tables

One `model.train_on_batch(ids, targets)` of `Input((32,), int32) ->
Embedding(V, 128) -> GlobalAveragePooling1D -> Dense(1)`, MSE, the model
compiled with Adam, at {sizes or "-"} rows: `keras.layers.Embedding` and
ours with `optimizer=None` (both trained densely by the model's Adam); ours
with `optimizer="sgd"`, `"adagrad"` and `"adam"` (the table steps only the
rows the batch looked up, with its own rule; the model's Adam trains the
Dense layer); ours with `lora_rank=8`, dense (`A` and `B` trained by the
model's Adam, the table frozen) and with `optimizer="adam"` (`A` stepped
row by row). On PyTorch, "torch SparseAdam" is PyTorch's own sparse
embedding training, the floor of the layers' steps: a plain `torch.nn`
module, `nn.Embedding(V, 128, sparse=True)` + mean + `nn.Linear(128, 1)`,
`torch.optim.SparseAdam` for the table and `Adam` for the linear layer (one
step: `zero_grad`, forward, MSE, `backward`, both `step`s). TensorFlow runs
every variant with `compile(jit_compile=False)` (Keras's default on a CPU)
and `jit_compile=True`. In parentheses: Keras's dense Adam time over the
variant's (above 1: faster than Keras).

A dense step costs in proportion to the vocabulary: autodiff of the gather
gives an `input_dim x 128` gradient (TensorFlow an `IndexedSlices`, which
Keras's Adam densifies) and Adam updates every row of the table and its two
moments. A row-sparse step reads and writes only the looked-up rows: under
XLA (JAX, TensorFlow with `jit_compile=True`) its cost follows the batch.
TensorFlow without XLA (`tensor_scatter_nd_update`) copies each stepped
variable once per step, PyTorch (functional scatter, then the optimizer's
`assign`) twice: still cheaper than a dense Adam step, but growing with the
vocabulary. Adam with `optimizer="adam"` is lazy Adam (see the guide
"Training big tables"): not the same table as dense Adam.

{physical_limit(data)}

{figure(images, "training_scaling")}

{tables}

## Lookups after a training step

`input_dim={size}`: `predict_on_batch(ids)` and an eager `layer(ids)` of
fresh models (compiled with `SGD(0.01)`, Keras's default execution; one
model per layer and call), timed before and after one `train_on_batch`,
for Keras's layer, ours with `optimizer=None` and ours with
`optimizer="sgd"`. On TensorFlow, Keras's
SGD applies the `IndexedSlices` gradient of a dense table as a sparse
update, which switches the variable to copy-on-read: from then on every
dense read of it copies the whole table, and `ops.take` on the variable
(Keras's lookup) reads it densely. Ours gathers from `variable.value`,
which a traced function reads sparsely; with `optimizer=` the table is
assigned, never sparsely updated. JAX and PyTorch have no such mode: their
rows are for comparison.

{figure(images, "lookup_after_training")}

{lookup_table}"""


def by_configuration(rows, lines):
    """A column per `(backend, row)` of `rows`, headed by its backend and
    mode, and a line per `(label, cell)` of `lines`, `cell(row)` its
    values: the bags sections measure few configurations many ways, which
    would make a row per configuration too wide to read."""
    header = ["", *(f"{backend} {step_mode(row['mode'])}" for backend, row in rows)]
    cells = [[label, *(cell(row) for _, row in rows)] for label, cell in lines]
    return table(header, "l" + "r" * len(rows), cells)


def timing(name):
    """The cell of variant `name`: its time, "-" where it was not run."""
    return lambda row: milliseconds(row[name]) if name in row else "-"


def bags_forward_table(data):
    rows = list(backend_rows(data, "bags"))
    names = [name for name in BAGS_COLUMNS if any(name in row for _, row in rows)]
    lines = [
        ("rows", lambda row: f"{row['input_dim']:,}"),
        ("reps", lambda row: row["ours"]["reps"]),
        *((f"{BAGS_COLUMNS[name]} (ms)", timing(name)) for name in names),
    ]
    return by_configuration(rows, lines)


def bags_met(row):
    """The forward row's verdict: every target met, or the missed ones."""
    met = row["met"]
    if any(value is None for value in met.values()):
        return "n/a"
    missed = [BAGS_RATIO_COLUMNS[ratio] for ratio, value in met.items() if not value]
    return "**no**: " + ", ".join(missed) if missed else "yes"


def bags_ratio_table(data):
    rows = list(backend_rows(data, "bags"))
    ratios = [
        ratio
        for ratio in BAGS_RATIO_COLUMNS
        if any(ratio in row["ratios"] for _, row in rows)
    ]
    lines = [
        ("hand-written (the faster)", lambda row: BAGS_COLUMNS[row["hand_written"]]),
        *(
            (
                BAGS_RATIO_COLUMNS[ratio],
                lambda row, r=ratio: number(row["ratios"].get(r)),
            )
            for ratio in ratios
        ),
        ("targets met", bags_met),
    ]
    return by_configuration(rows, lines)


def bags_training_table(data):
    rows = list(backend_rows(data, "bags_training"))
    names = [n for n in BAGS_TRAIN_COLUMNS if any(n in row for _, row in rows)]
    lines = [
        ("rows", lambda row: f"{row['input_dim']:,}"),
        ("reps", lambda row: row["ours"]["reps"]),
        *((f"{BAGS_TRAIN_COLUMNS[name]} (ms)", timing(name)) for name in names),
        (
            "EmbedReduce / ours 'adam'",
            lambda row: number(row["ratios"]["embed_reduce_over_ours_adam"], "x"),
        ),
        (
            "ours 'adam' / torch",
            lambda row: number(row["ratios"].get("ours_adam_over_native")),
        ),
        ("target", lambda row: row["target"]),
        ("met", lambda row: verdict(row["met"])),
    ]
    return by_configuration(rows, lines)


def bags_memory_table(data):
    rows = [
        [
            backend,
            BAGS_MEMORY_LABELS[entry["config"]],
            f"{entry['table_bytes'] / 2**20:.1f}",
            f"{entry['peak_increase_mb']:.1f}",
            number(entry["temporary_mb"]),
            f"{entry['output_mb']:.2f}",
            "yes" if has_temporary(entry) else "no",
        ]
        for backend, entry in backend_rows(data, "bags_memory")
    ]
    header = ["backend", "configuration", "tables (MiB)"]
    header += ["peak RSS increase (MiB)", "a table-sized temporary (MiB)"]
    header += ["output (MiB)", "table-sized temporary"]
    return table(header, "llrrrrl", rows)


def bags_memory_verdict(data):
    """Ours (every format of EmbeddingBag) must add no table-sized
    temporary; the other rows are for comparison."""
    ours = [e for _, e in backend_rows(data, "bags_memory") if e["ours"]]
    if not ours:
        return "not measured"
    if data["quick"]:
        # A 10,000-row table is smaller than the batch's own temporaries.
        return "n/a (a `--quick` run)"
    return "**not met**" if any(map(has_temporary, ours)) else "met"


def bags_sections(data):
    forward = [row for _, row in backend_rows(data, "bags")]
    steps = [row for _, row in backend_rows(data, "bags_training")]
    memory = [entry for _, entry in backend_rows(data, "bags_memory")]
    first = forward[0] if forward else None
    size = f"{first['input_dim']:,}" if first else "-"
    ids = f"{first['ids']:,}" if first else "-"
    if data["settings"]["memory_in_timing_process"]:
        processes = "all measured one after the other in the timing process"
    else:
        processes = "each measured in a fresh process"
    forward_tables = not_measured(forward, "bags") or (
        f"{bags_forward_table(data)}\n\n{bags_ratio_table(data)}"
    )
    return f"""## Bags of ids: EmbeddingBag

A DLRM-like batch: 1,024 bags of 1 to 50 ids (lengths uniform in [1, 50],
{ids} ids in all, uniform in `[1, V)`, a fixed seed), `V = {size}` rows,
`output_dim=64`, `combiner="mean"`, every table holding the same values.
"ours dense" is `keras_ext_embedding.EmbeddingBag(V, 64, combiner="mean",
mask_zero=True)` on the bags padded with id 0 to `1024 x 50`; "ours flat"
the same layer on the ids one bag after the other, `layer(flat_ids,
lengths=lengths)`. "EmbedReduce" is keras-rs `EmbedReduce(V, 64,
combiner="mean")` on the padded ids: it **counts the padding id 0 in its
mean** (with or without `mask_zero=True`), so it computes another result
(checked against that mean); it is timed as the peer layer all the same.
"Embedding + pool" is our `Embedding` lookup, then the masked mean written
with `keras.ops`. The hand-written `keras.ops` references read a plain
variable: "take + mean" is `ops.take` then the masked mean over the padded
ids, "take + segment_sum" `ops.take` of the flat ids then `ops.segment_sum`
over their bag ids (given as an input, as a pipeline would) divided by the
lengths; the faster of the two in each mode is "hand-written". On PyTorch,
"torch EmbeddingBag" is `torch.nn.EmbeddingBag(V, 64, mode="mean")` on the
flat ids and the bags' start offsets, the floor. Every output is checked
equal to ours before timing. Modes as in the other sections: eager,
`tf.function` without and with XLA, `jax.jit` of `stateless_call`, PyTorch
eager (where ours also checks the ids on the host).

Targets: ours (dense and flat) within 1.3x of the best hand-written
`keras.ops`, and ours on the padded ids no slower than EmbedReduce on the
same ids.

{forward_tables}

### Training step

One `train_on_batch` of `Input((50,), int32) -> bag layer -> Dense(1)`, MSE,
the model compiled with Adam (TensorFlow: `jit_compile=False` and `True`):
ours trained densely by the model's Adam ("ours Adam"), ours with
`optimizer="adam"` (the table steps only the looked-up rows, lazy Adam),
and EmbedReduce (dense Adam). On PyTorch, "torch SparseAdam" is
`nn.EmbeddingBag(V, 64, mode="mean", sparse=True)` on the flat ids and
offsets + `nn.Linear(64, 1)`, stepped by `SparseAdam` and `Adam`. The first
losses of ours and torch's are checked equal (EmbedReduce's differs: it
averages the padding rows in). Target: EmbedReduce's dense step at least
20x slower than ours with `optimizer="adam"` where XLA compiles the step.

{not_measured(steps, "bags") or bags_training_table(data)}

### Peak memory of one bag forward pass

The peak RSS increase of one eager forward pass on the batch, {processes},
as in "Table bytes and peak memory" below: the tables (every variable:
scales, LoRA factors) are resident before the pass, so the increase is what
the pass itself adds over them. "a table-sized temporary" is a float32 `V
x 64` array (a table with LoRA's delta added, or dequantized), for every
format; "table-sized temporary" says "yes" where the increase is at least
half of it. The batch's own arrays are much smaller but not negligible: its
gathered rows are `1024 x 50 x 64` float32 (12.5 MiB), and an eager pass
makes several such (more for quantized rows, which are unpacked and
dequantized; PyTorch also keeps some for autograd). int8 and int4 (groups
of 128, what `quantize("int4")` makes) are built in their dtype policy,
LoRA is rank 4 with a non-zero `B`. Target: no format of ours adds a
table-sized temporary: {bags_memory_verdict(data)}.

{not_measured(memory, "bags") or bags_memory_table(data)}"""


def mib(value):
    return f"{value / 2**20:.1f}"


def sharded_size_table(rows):
    """One vocabulary size: a row per device count, for each configuration
    the bytes its busiest device holds, that over the ideal, and the median
    step; then Keras's step time over ours."""
    configs = [c for c in SHARDED_LABELS if any(r["config"] == c for r in rows)]
    by_key = {(row["config"], row["devices"]): row for row in rows}
    cells = []
    for n in sorted({row["devices"] for row in rows}):
        found = [by_key.get((config, n)) for config in configs]
        ideals = dict.fromkeys(mib(r["ideal_device_bytes"]) for r in found if r)
        line = [n, " / ".join(ideals)]
        for row in found:
            if row is None:
                line += ["-", "-", "-"]
                continue
            ratio = number(row["over_ideal"], "x")
            line += [
                mib(row["max_device_bytes"]),
                ratio if row["met"] else f"**{ratio}**",
                milliseconds(row["step"]),
            ]
        keras_row, ours_row = (by_key.get((c, n)) for c in SHARDED_LABELS)
        speedup = None
        if keras_row and ours_row:
            speedup = keras_row["step"]["median_ms"] / ours_row["step"]["median_ms"]
        cells.append([*line, number(speedup, "x")])
    header = ["devices", "ideal (MiB per device)"]
    for config in configs:
        name = SHARDED_COLUMNS[config]
        header += [f"{name}: MiB per device", f"{name}: / ideal", f"{name} (ms)"]
    header += ["keras Adam time / ours"]
    return table(header, "r" * len(header), cells)


def sharded_layout_cell(found):
    """The specs of one variable and device count, `{(built, after
    training): [sizes]}`: each pair once, with its sizes where they differ."""
    cells = []
    for (built, trained), sizes in found.items():
        text = f"`{built}`" if built == trained else f"`{built}` -> `{trained}`"
        if len(found) > 1:
            text += f" ({', '.join(rows_label(size) for size in sizes)} rows)"
        cells.append(text)
    return "; ".join(cells)


def sharded_layout_table(rows):
    """Each table-sized variable's sharding spec per device count (one
    spec where every size agrees; `built -> after training` where the steps
    changed it)."""
    specs = {}
    for row in rows:
        for variable in row["variables"]:
            key = (row["config"], variable["path"])
            pair = (variable["spec"], variable["spec_after_training"])
            by_count = specs.setdefault(key, {}).setdefault(row["devices"], {})
            by_count.setdefault(pair, []).append(row["input_dim"])
    counts = sorted({row["devices"] for row in rows})
    cells = [
        [
            SHARDED_COLUMNS[config],
            f"`{path}`",
            *(sharded_layout_cell(by_count.get(n, {})) or "-" for n in counts),
        ]
        for (config, path), by_count in specs.items()
    ]
    header = ["layer", "variable", *(f"{n} device{'s' * (n > 1)}" for n in counts)]
    return table(header, "l" * len(header), cells)


def and_list(items):
    """`a, b and c`."""
    items = list(items)
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def sharded_verdict(rows):
    if not rows:
        return "not measured"
    return "met" if all(row["met"] for row in rows) else "**not met**"


def sharded_sections(data, images):
    rows = [row for _, row in backend_rows(data, "sharded")]
    heading = "## Tables sharded by rows: keras.distribution on JAX"
    if not rows:
        return f"{heading}\n\n{not_measured(rows, 'sharded')}"
    first = rows[0]
    sizes = sorted({row["input_dim"] for row in rows})
    counts = sorted({row["devices"] for row in rows})
    batch = " x ".join(map(str, first["batch_shape"]))
    tables = "\n\n".join(
        f"### {size:,} rows\n\n"
        + sharded_size_table([row for row in rows if row["input_dim"] == size])
        for size in sizes
    )
    return f"""{heading}

Tables of {and_list(f"{size:,}" for size in sizes)} rows,
`output_dim={first["output_dim"]}` (float32), sharded by rows with
`keras.distribution` over {and_list(map(str, counts))} of the 8 virtual CPU
devices of one JAX process (`XLA_FLAGS=--xla_force_host_platform_device_count=8`): a
`DeviceMesh((1, n), ["batch", "model"])`, a `LayoutMap` with the single rule
`layout_map["tokens/embeddings"] = ("model", None)` (on purpose: no rule
for Adam's moments) and `ModelParallel(layout_map=...,
batch_dim_name="batch")`. The model is `Input((4,), int32) -> Embedding(V,
{first["output_dim"]}, name="tokens") -> GlobalAveragePooling1D ->
Dense(1)`, MSE, `{batch}` ids per batch (Zipf-distributed, scattered over
the rows). "keras Adam": `keras.layers.Embedding`, the model compiled with
`Adam(1e-3)`, whose moments Keras creates with the table's layout, and a
dense gradient per step. "ours 'adam'":
`keras_ext_embedding.Embedding(optimizer="adam")`, the model compiled with
`SGD(1e-3)` (for the Dense layer): the layer lays out its moments
(`tokens/embeddings_momentum`, `_velocity`) after the table and steps only
the looked-up rows of the three.

"MiB per device" is the most any device holds of the table-sized variables
(the table and its two moments, for both layers): the bytes of their shards
on it (`variable.value.addressable_shards`), after the timed steps (and
checked at build too); "ideal" is their total bytes over the device count.
Target: within {first["target"].removeprefix("<= ")} on every row:
{sharded_verdict(rows)}. The times are medians of `train_on_batch` after
`model.fit` compiled the step. The virtual devices share this machine's
{data["machine"]["cores"]} cores: more devices split the memory, not the
cores, and the step pays for the partitioned program's collectives, so the
times show the cost of sharding on one host, not a speedup. A dense step
updates every row: its work is split between the devices. A row-sparse step
touches the batch's rows only, but each device goes through every id of the
batch (gathering and updating the rows it holds, masking the others), so
its time grows with the device count on shared cores.

{figure(images, "sharded_tables")}

{tables}

### Layouts

Each table-sized variable's `PartitionSpec` (`variable.value.sharding.spec`)
once the model and its optimizer are built, the same after the timed steps
unless an arrow shows the change. On one device a variable is whole: JAX
places it with a `SingleDeviceSharding` (no spec), or, where Keras
initialized it partitioned (a large variable), `P('model', None)` over a
mesh of one device. `P('model',)` and `P('model', None)` are the same
layout (JAX drops trailing `None`s): rows over the `model` axis.

{sharded_layout_table(rows)}"""


def memory_sections(data, images):
    memory = [entry for _, entry in backend_rows(data, "memory")]
    size = f"{memory[0]['input_dim']:,}" if memory else "-"
    if data["settings"]["memory_in_timing_process"]:
        processes = (
            "all measured one after the other in the timing process of the "
            "backend (a `--quick` run: memory freed before can hide a "
            "temporary)"
        )
    else:
        processes = "each measured in a fresh process (see below)"
    return f"""## Table memory of the quantized layers

The bytes of every variable of the layer (quantized table, scales, zero
points, `g_idx`), against the float32 table, `output_dim=128`. Ours and
Keras's hold the same variables.

{table_bytes_table(data)}

## Table bytes and peak memory of one forward pass

`input_dim={size}`, `output_dim=128`; "table" is the sum of the bytes of
the layer's variables (LoRA factors included). The peak RSS increase is that
of one eager forward pass, {processes}. "a table-sized temporary" is the
size of an `input_dim x output_dim` array in the dtype such a temporary
would have: float32 for a float32 table (with the LoRA delta added) and for
a dequantized int8 table, bfloat16 for a bfloat16 table, int8 for an
unpacked int4 table; "table-sized temporary" says "yes" where the increase
is at least half of that.

{figure(images, "memory")}

{memory_table(data)}

Target: ours adds no `input_dim x output_dim` temporary: {memory_verdict(data)}.
Keras's layer makes one for LoRA and int4 tables (the unit suite shows it in
the computation itself); where a Keras row shows none, its allocator served
the temporary from memory it already held, which the resident set size does
not see."""


def not_measured(rows, section):
    if rows:
        return None
    return f"*Not measured in this run (`--sections` left `{section}` out).*"


def gb_s(value):
    return number(value)


def with_gb_s(summary, value):
    """`median ± IQR/2 (GB/s)`, which a narrow column breaks before the
    bandwidth only."""
    return f"{milliseconds(summary)} ({gb_s(value)}&nbsp;GB/s)"


def target_cell(row):
    """The row's target and whether it was met; "-" for a row measured for
    information."""
    if row["target"].startswith("none"):
        return "-"
    return f"{row['target']}: {verdict(row['met'])}"


def reverse_tables(data):
    """A table per (hidden states, vocabulary size), which its first line
    names with the repetitions, where they are the same on every row."""
    groups = {}
    for backend, row in backend_rows(data, "reverse_projection"):
        key = (row["hidden"], tuple(row["hidden_shape"]), row["input_dim"])
        groups.setdefault(key, []).append((backend, row))
    # Hidden states in the order measured (decode first), then by size.
    hiddens = list(dict.fromkeys(key[0] for key in groups))
    parts = []
    for key in sorted(groups, key=lambda k: (hiddens.index(k[0]), k[2])):
        hidden, shape, size = key
        rows = groups[key]
        reps = {row["ours"]["reps"] for _, row in rows}
        targets = any(not row["target"].startswith("none") for _, row in rows)
        cells = [
            [
                backend,
                REVERSE_LABELS[row["format"]],
                row["mode"],
                *([] if len(reps) == 1 else [row["ours"]["reps"]]),
                with_gb_s(row["ours"], row["ours_gb_s"]),
                with_gb_s(row["keras"], row["keras_gb_s"]),
                with_gb_s(row["floor"], row["floor_gb_s"]),
                ratio_cell(row["ratio"]),
                number(row["ours_over_floor"]),
                *([target_cell(row)] if targets else []),
            ]
            for backend, row in rows
        ]
        header = ["backend", "table", "mode", *([] if len(reps) == 1 else ["reps"])]
        header += ["ours (ms)", "keras (ms)", "floor (ms)"]
        header += ["ours/keras (keras/ours)", "ours/floor"]
        header += ["target"] if targets else []
        align = "lll" + "r" * (len(header) - 3 - targets) + "l" * targets
        lead = f"**{hidden} `{' x '.join(map(str, shape))}`, {size:,} rows**"
        if len(reps) == 1:
            lead += f", {reps.pop()} repetitions"
        if not targets:
            lead += ", for information (no target)"
        parts.append(f"{lead}:\n\n{table(header, align, cells)}")
    return "\n\n".join(parts)


def reverse_memory_table(data):
    rows = [
        [
            backend,
            REVERSE_LABELS[entry["format"]],
            entry["impl"],
            f"{entry['table_bytes'] / 2**20:.1f}",
            f"{entry['peak_increase_mb']:.1f}",
            number(entry["limit_mb"]),
            f"{entry['logits_mb']:.1f}",
            verdict(entry["met"]) if entry["impl"] == "ours" else "-",
        ]
        for backend, entry in backend_rows(data, "reverse_memory")
    ]
    header = ["backend", "table", "layer", "table (MiB)"]
    header += ["peak RSS increase (MiB)", "target: at most (MiB)", "logits (MiB)"]
    header += ["met"]
    return table(header, "lllrrrrl", rows)


def per_token(summary, tokens):
    return milliseconds(
        {
            "median_ms": summary["median_ms"] / tokens,
            "iqr_ms": summary["iqr_ms"] / tokens,
        }
    )


def decoding_table(data):
    rows = [
        [
            backend,
            DECODING_LABELS[row["format"]],
            f"{row['vocab']:,}",
            f"{row['batch']} x {row['prompt']} -> {row['length']}",
            row["ours"]["reps"],
            per_token(row["ours"], row["new_tokens"]),
            per_token(row["keras"], row["new_tokens"]),
            number(1 / row["ratio"], "x"),
            "yes"
            if row["same_tokens"]
            else f"**no** (first at {row['first_difference']})",
        ]
        for backend, row in backend_rows(data, "decoding")
    ]
    header = ["backend", "model", "vocabulary", "prompt -> length", "reps"]
    header += ["ours (ms/token)", "keras (ms/token)", "keras/ours", "same tokens"]
    return table(header, "lllrrrrrl", rows)


def reverse_verdict(data):
    ours = [e for _, e in backend_rows(data, "reverse_memory") if e["impl"] == "ours"]
    verdicts = [e["met"] for e in ours]
    if not ours:
        return "not measured"
    if any(met is None for met in verdicts):
        return "n/a (a `--quick` run)"
    return "met" if all(verdicts) else "**not met**"


def reverse_sections(data, images):
    settings = data["settings"]
    rows = [row for _, row in backend_rows(data, "reverse_projection")]
    memory = [entry for _, entry in backend_rows(data, "reverse_memory")]
    decoding = [row for _, row in backend_rows(data, "decoding")]
    sizes = ", ".join(f"{size:,}" for size in settings.get("reverse_sizes", ()))
    prefill = sorted({row["input_dim"] for row in rows if row["hidden"] == "prefill"})
    prefill_sizes = ", ".join(f"{size:,}" for size in prefill) or "-"
    vocab = f"{settings['decoding_vocab']:,}" if "decoding_vocab" in settings else "-"
    size = f"{memory[0]['input_dim']:,}" if memory else "-"
    if settings["memory_in_timing_process"]:
        processes = "all measured one after the other in the timing process"
    else:
        processes = "each measured in a fresh process"
    return f"""## Reverse projection: ReversibleEmbedding logits

`keras_ext_embedding.ReversibleEmbedding` ("ours") against
`keras.layers.ReversibleEmbedding` ("keras"), tied weights, `output_dim=512`,
at {sizes or "-"} rows, on the hidden states of one decoding step of 8
sequences (`decode`, `8 x 512`) and, at {prefill_sizes} rows, of a `4 x 64`
prompt (`prefill`): one `layer(h, reverse=True)` call, its logits
`h @ table^T`. Both layers hold
the same float32 table and are quantized alike (`quantize(mode,
config=...)`); "floor" is the table-first matmul `transpose(matmul(W,
transpose(h)))` on a tensor holding the float32 table, one pass over its
bytes (the fastest public form: `einsum("...d,vd->...v", h, W)` took
several times as long on a few hidden states). In parentheses after each
time, its GB/s: the layer's
stored table bytes (scales, zero points and LoRA factors included; the
floor: the float32 table) over the median time, how close each call comes
to streaming its table once. The floor's GB/s on the float32 table is the
memory bandwidth such a read reaches on this machine. `ours/keras` below 1
means ours is faster; in parentheses, `keras/ours`, the speedup.

Targets, eager, one decoding step, each backend: float32 within 1.3x of the
floor; LoRA at least 5x and int4 in groups of 128 at least 3x faster than
Keras's; int8 at most 1.2x Keras's time. Prefill and compiled rows are for
information: a prefill call is compute-bound (256 tokens), and compiled,
XLA fuses Keras's transpose into the product.

{figure(images, "reverse_projection")}

{not_measured(rows, "reverse_projection") or reverse_tables(data)}

## Peak memory of one reverse projection

`input_dim={size}`, `output_dim=512`, decode hidden states (`8 x 512`): the
peak RSS increase of one eager reverse call, {processes}. Target: no call of
ours adds more than a quarter of the float32 table's bytes:
{reverse_verdict(data)}. Keras's rows are for comparison (its LoRA call adds
the delta to a new float table; its int4 call unpacks and dequantizes the
whole table).

{figure(images, "reverse_memory")}

{not_measured(memory, "reverse_projection") or reverse_memory_table(data)}

## Greedy decoding with a keras-hub causal LM

`keras_hub.models.GemmaCausalLM`, 2 layers, `hidden_dim=256`, built from its
constructor arguments (no preset, no tokenizer, nothing downloaded), its
tied token embedding of vocabulary {vocab}: the stock
model against the same weights after `keras_ext_embedding.replace_embeddings`,
both `compile(sampler="greedy")`, one `generate` of token ids (prompt ->
length below, `stop_token_ids=None`) per repetition, shown per generated
token. "LoRA" is `backbone.enable_lora(8, target_layer_names=
["token_embedding"])` with a non-zero `B`; int8 and int4 are
`model.quantize(mode)` (the dense layers too). "same tokens": the generated
ids of both models are equal.

{figure(images, "decoding")}

{not_measured(decoding, "reverse_projection") or decoding_table(data)}"""


METHOD = """## How it is measured

`keras_ext_embedding.Embedding` ("ours", default configuration:
`invalid_ids="raise"`, plus `invalid_ids="zeros"` for plain lookups) against
`keras.layers.Embedding` ("keras"), both in the same process on the same ids
(a `64 x 32` int32 batch, already a backend tensor) and the same weights,
`output_dim=128`, LoRA rank 8 with a non-zero `B`. The reverse-projection
sections compare `keras_ext_embedding.ReversibleEmbedding` with
`keras.layers.ReversibleEmbedding` (logits of hidden states, `output_dim=512`)
and greedy decoding with a keras-hub causal LM, stock and after
`replace_embeddings`.

- `benchmarks/run.py` starts `benchmarks/bench_backend.py` in one process per
  backend (`KERAS_BACKEND` set, `TF_CPP_MIN_LOG_LEVEL=3`), one after the
  other, for every timing; then one process per (backend, configuration,
  layer) for memory (of a lookup and of a reverse projection), two at a
  time (the resident set size of a process does not depend on its
  neighbours). `--quick` runs tiny sizes with few
  repetitions and measures memory in one process per backend;
  `--backends jax,torch` runs a subset; `--output-dir DIR` writes the page,
  the JSON and `img/` there.
- Every callable is warmed up first (first calls trace and compile), then
  timed with `time.perf_counter()`. JAX dispatches asynchronously, so each
  timed call ends with `jax.block_until_ready` on its result; TensorFlow and
  PyTorch on CPU return finished tensors; `train_on_batch` returns the loss
  as Python floats, after the step has finished.
- Before timing, the outputs of the layers are checked equal on the ids, and
  those of the native op equal to ours.
- Compiled modes. *tf.function*: `tf.function(layer.__call__,
  jit_compile=False)`; *tf.function XLA*: the same with `jit_compile=True`.
  *jax.jit*: `jax.jit` of `layer.stateless_call(trainable, non_trainable,
  ids)`, the variables passed as arguments (the native `jnp.take` gets its
  table as an argument too). *torch.compile*: `torch.compile(layer.__call__)`,
  in the plain-lookup section only, for information: on CPU each first call
  compiles for seconds (`first_call_s` in the JSON), and the guards and
  graph breaks in Keras's `Layer.__call__` make the compiled call slower
  than eager for both layers; Keras itself does not compile on PyTorch by
  default.
- **Where ours is slower than Keras's layer** (every such cell is listed
  under the headline), the op that costs it:
  - *Eager lookups*: ours dispatches the one op Keras's does (the gather),
    after one NumPy reduction over the ids on the host (the check: signed
    ids read as unsigned, so a negative id is larger than any valid one)
    and the layer's own Python; "zeros" on TensorFlow and JAX checks the
    ids the same way when they are in host memory. What remains is the
    Python of the call, tens of microseconds.
  - *"zeros" on eager PyTorch*: the device's clip, compare and select, the
    select a pass over the looked-up rows. PyTorch's traces
    (`torch.onnx.export`, torch.compile) read as eager tensors, so reading
    the ids on the host would make the example ids' validity part of an
    exported model. The fastest public configuration on eager PyTorch is
    the default, `invalid_ids="raise"`.
  - *int8, eager*: one more small op than Keras's: `2 / scale` on the
    gathered scales, then a product, where Keras divides the rows. XLA turns
    Keras's division into that product, and the same bits on every backend
    and mode need the same form everywhere. The same op shows, smaller, in
    *int8 with LoRA against Keras's int8 with LoRA* (the LoRA product and
    sum are the same ops as Keras's).
  - *int4 with LoRA against Keras's int8 with LoRA, eager*: the unpacking
    of the gathered bytes into their two nibbles, which int8 does not need:
    one gather from a 256-row table of nibbles on TensorFlow and JAX; on
    PyTorch, whose Keras `take` widens and wraps every index, five int8 ops,
    a stack and a cast, the form its ONNX export translates exactly.
  - *int4 under XLA* (`jax.jit`, `jit_compile=True`): the unpacking's
    arithmetic, which XLA fuses but Keras's int8 does not need; Keras's own
    int4 layer unpacks the whole table, which XLA moves after the gather. A
    TensorFlow trace on a machine without an accelerator unpacks by the
    table of nibbles (faster in a graph without XLA, Keras's default on a
    CPU), which XLA runs slower than the arithmetic: on a CPU,
    `jit_compile=True` is the slower choice for int4 tables.
  - *torch.compile, `invalid_ids="raise"`*: one graph break, to read the
    ids on the host and raise at an invalid one; no public Keras API tells a
    layer that torch.compile traces it. "zeros" reads no id on PyTorch and
    compiles into one graph, as Keras's layer.
  - *Reverse projection of a prompt* (prefill, 256 hidden states): ours
    reads the table in vocabulary chunks, each widened to float32 (int8:
    for the exact integer product; int4: unpacked), and never holds the
    float table that Keras's int8 and int4 calls build (the memory rows
    above). Keras's int8 x int8 product compiles to XLA's integer dot,
    faster than float32 GEMMs on a compute-bound prompt; a decoding step
    (8 hidden states) is faster with ours. A one-state step under
    `jax.jit` takes Keras's form (docs/guides/language_models.md).
- **lookup / plain lookup**: no LoRA; ours (`invalid_ids` "raise" and
  "zeros"), Keras's and the native op timed together, in rotating order. The
  native op gathers from its own copy of the table (a `tf.Variable` on
  TensorFlow). On TensorFlow, a sparse read of a variable (`tf.gather` on
  it) or a sparse update (an optimizer applying the `IndexedSlices`
  gradient of an embedding) switches the variable to copy-on-read, and from
  then on every dense read copies the whole table. Keras's layer gathers
  with `ops.take` on the variable, which converts it to a tensor (a dense
  read) first, so after one training step its lookups copy the table
  (keras-team/keras#15376 reports the copy in Keras 2); ours gathers from
  `variable.value`. "Lookups after a training step" above measures both.
  The timings here are of fresh layers.
- **lora_forward / scaling**: `lora_rank=8` for both layers, with a non-zero
  `B` so that the delta is real work; eager and compiled as above. One size
  is built at a time and freed before the next (a 4M x 128 float32 table is
  2 GiB per layer); the large sizes get fewer repetitions.
- **int8 / int4 lookup**: no LoRA; both layers quantized alike from the same
  float table with `quantize(mode, config=...)`: int8, int4 with one scale
  per row (`block_size=None`), and int4 in Keras's default groups of 128.
  Keras's int4 call unpacks the whole table before its gather; ours gathers
  the packed rows and unpacks those.
- **int8 / int4 LoRA forward**: the same quantized tables with
  `enable_lora(8)` and a non-zero `B`; ours on int8 and on int4 (groups of
  128) against Keras's LoRA on int8 (the target), and ours on int4 against
  Keras's on int4 (for information).
- **lora_train / training step**: `Input -> Embedding -> GlobalAveragePooling1D`,
  `compile(SGD(0.01), "mse")`, one `model.train_on_batch(ids, targets)` per
  repetition. Keras's default execution per backend: XLA on JAX,
  `tf.function` without XLA on a TensorFlow CPU, eager on PyTorch (where
  ours checks the ids on the host at every step).
- **Training big tables**: every variant's model is built from seeded
  initializers (the table: Keras's `uniform` range; the Dense kernel:
  Glorot), the PyTorch module given the same arrays, and the first step's
  losses are checked equal (within `rtol=1e-4`) before any timing; that
  first call traces and compiles (`first_call_s` in the JSON). Below
  4,000,000 rows the variants of a mode are timed together in rotating
  order; at 4,000,000 rows (6 GiB for a table and Adam's moments) each one
  is built, timed and freed alone, so that one model at a time is alive.
  The "one pass" floor is the bytes a step must read and write over the
  bandwidth of `numpy.copyto` of a 256 MiB array (read and written) in the
  same process. The lookup part's models are fresh, compiled with
  `SGD(0.01)` and Keras's default execution; its six calls are timed
  together before the training step and again after it.
- From 1M rows on, each timed call follows an untimed call of the same
  callable. There a Keras call leaves work running after it returns
  (gigabytes of temporaries to free), which slowed whatever call came next:
  timed right after it, our JAX training step measured 5x its steady time.
  The untimed call absorbs the other layer's leftovers; each layer still
  pays for its own previous call, as in a training loop.
- PyTorch runs with `OMP_WAIT_POLICY=PASSIVE` (unless set otherwise): with
  the default policy, on this loaded machine, every multi-threaded op at
  times stalled until the next scheduler tick, so that a 0.1 ms lookup took
  exactly 8 ms for both layers.
- **Bags**: the forward passes of a mode are timed together in rotating
  order after their first call (`first_call_s` in the JSON: tracing and
  compiling) and the check of their outputs; the training steps likewise,
  each timed step at 1M rows following an untimed one (as for training
  big tables). Peak memory is measured as below, one (backend,
  configuration) per fresh process in a full run.
- **Sharded tables**: one JAX process (`XLA_FLAGS` gives it 8 virtual CPU
  devices) measures every size, layer and device count in turn: the
  distribution is set, the model built and compiled, its optimizer built
  (`model.optimizer.build`), the shards of the table-sized variables
  counted, then `model.fit` on a few batches compiles the step, one untimed
  `train_on_batch` follows, then the timed ones (each returns the loss as a
  Python float, after the step has finished) and the shards are counted
  again; then the distribution is unset, the model deleted and
  `keras.backend.clear_session()` and the garbage collector free it.
- **Peak memory**: imports and first-call setup run on a small layer; then
  the layer is built directly in its dtype policy (an int4 layer with
  `int4/128_from_float32`: quantizing a float table first would leave
  TensorFlow's allocator holding the freed table, and the forward pass's
  temporaries would reuse it unseen), its variables are waited for, and the
  process waits until its resident set size stays put for a second (JAX
  computes and frees the initializer's gigabyte of temporaries
  asynchronously, after `build()` returns). Then the peak resident set size
  is lowered to the current one (`/proc/self/clear_refs`) and the increase
  of the peak (`resource.getrusage(...).ru_maxrss`) over one eager forward
  pass is reported. Memory an allocator reuses without asking the OS does
  not show, so an increase is a lower bound of what the pass allocates.
- **Reverse projection**: both layers built from the same seeded float32
  table (one NumPy array), then `enable_lora(8)` with a non-zero `B` and the
  same `A`, or `quantize("int8")`, `quantize("int4",
  config=Int4QuantizationConfig(block_size=None))` (one scale per row) or
  `block_size=128`. Before timing, in every mode, the logits of both layers
  are checked equal (int8: bit for bit; the others within float32 rounding,
  `rtol=1e-5, atol=2e-5`), and the floor's equal to ours on the float32
  table. Ours, Keras's and the floor are timed together, in rotating order;
  at the full sizes each timed decode call follows an untimed one (Keras's
  LoRA and int4 calls leave table-sized temporaries to free, which slowed
  the next call). Compiled: `jax.jit` of
  `layer.stateless_call(trainable, non_trainable, h, reverse=True)` (the
  floor gets its table as an argument), `tf.function(jit_compile=True)`;
  PyTorch eager only.
- **Peak memory of a reverse call**: as for a lookup above, per (backend,
  format, layer): a call of a 1,000-row layer of the same format first, then
  the layer built directly in its dtype policy (`int8_from_float32`,
  `int4/-1_from_float32`, `int4/128_from_float32`, with the timings'
  `Int4QuantizationConfig`), its resident set size settled and its peak
  reset, and one eager reverse call on `8 x 512` hidden states.
- **Greedy decoding**: two models built alike, the second given the first's
  weights and then `replace_embeddings`; LoRA or quantization applied to
  both alike, then `compile(sampler="greedy")`. The first `generate` of each
  (which traces and compiles) gives the compared tokens; the timed ones
  follow, in rotating order. Each `generate` runs the prompt through the
  model, then one step per new token (a lookup of one id and a projection
  of one hidden state onto the vocabulary); "per token" is its time over
  the number of new tokens."""


# Material's own front matter: the page's tables and figures get the full
# width of the window (1,188 px of text at 1,280 px) without the navigation
# and the table of contents, which the line of contents replaces.
FRONT_MATTER = """---
hide:
  - navigation
  - toc
---"""


def anchor(heading):
    """The id Python-Markdown's toc extension gives a heading (its default
    `slugify`), which MkDocs's strict build checks every link against."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def contents(sections):
    """A line of links to the page's sections (`##` headings)."""
    headings = re.findall(r"^## (.+)$", "\n\n".join(sections), re.M)
    links = " · ".join(f"[{h}](#{anchor(h)})" for h in headings)
    return f"**On this page:** {links}"


def markdown(data, images):
    """The page: what it compares, the headline and the machine first; the
    sections; then how it is measured and the runs it comes from."""
    sections = [
        headline_section(data),
        machine_section(data),
        speed_sections(data, images),
        training_sections(data, images),
        bags_sections(data),
        sharded_sections(data, images),
        memory_sections(data, images),
        reverse_sections(data, images),
        METHOD,
        history_section(data),
    ]
    parts = [FRONT_MATTER, intro(data), contents(sections), *sections]
    return "\n\n".join(parts) + "\n"

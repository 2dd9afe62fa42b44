"""The Markdown page of a benchmark run (`docs/benchmarks.md` for `make bench`).

`markdown(data, images)` renders the JSON document `run.py` writes, and the
figures `plots.write_all` drew, as one MkDocs page: a headline of the key
ratios, the tables and figures of each section, then how it is measured.
Links stay inside the output directory (the figures in `img/`, the JSON
beside the page): MkDocs's strict mode rejects links outside `docs/`.
"""

from labels import BACKEND_TITLES, MEMORY_LABELS, native_op

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

    def native(field, compiled_modes):
        def cell(entry):
            modes = [m for m in entry["native"] if (m != "eager") == compiled_modes]
            return " / ".join(number(entry["native"][m][field]) for m in modes) or "-"

        return cell

    lora = f"{summary['lora_input_dim']:,} rows"
    floor = f"plain lookup, {summary['native_input_dim']:,} rows"
    quantized = f"{summary['quantized_input_dim']:,} rows"
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
    header = ["", *(BACKEND_TITLES[b] for b in backends)]
    return f"""## Headline

Medians of this run; `64 x 32` ids, `output_dim=128`, LoRA rank 8.
"Compiled" lists each compiled mode of the backend in the order of the
tables below (`tf.function` / `tf.function` with XLA; `jax.jit`;
`torch.compile`). "Native op" is the backend's own gather on the same table
(`tf.gather`, `jnp.take`, `torch.nn.functional.embedding`), the floor of any
layer: 1.0 means no overhead.

{table(header, "l" * len(header), rows)}"""


def speed_table(data):
    rows = [
        [
            backend,
            f"{row['case']} ({row['input_dim']:,} rows)",
            row["mode"],
            f"invalid_ids={row['variant']!r}",
            row["ours"]["reps"],
            milliseconds(row["ours"]),
            milliseconds(row["keras"]),
            f"{row['ratio']:.2f}",
            f"{1 / row['ratio']:.1f}x",
            row["target"],
            verdict(row["met"]),
        ]
        for backend, row in backend_rows(data, "speed")
    ]
    header = ["backend", "case", "mode", "ours", "reps", "ours (ms)", "keras (ms)"]
    header += ["ours/keras", "keras/ours", "target", "met"]
    return table(header, "llllrrrrrll", rows)


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


def native_table(data):
    rows = [
        [
            backend,
            f"{row['input_dim']:,}",
            row["mode"],
            native_op(backend, row["mode"]),
            row["native"]["reps"],
            milliseconds(row["native"]),
            milliseconds(row["ours"]),
            milliseconds(row["ours_zeros"]),
            milliseconds(row["keras"]),
            number(row["ours_over_native"]),
            number(row["ours_zeros_over_native"]),
            number(row["keras_over_native"]),
        ]
        for backend, row in backend_rows(data, "native_floor")
    ]
    header = ["backend", "rows", "mode", "native op", "reps", "native (ms)"]
    header += ["ours (ms)", "ours zeros (ms)", "keras (ms)"]
    header += ["ours/native", "ours zeros/native", "keras/native"]
    return table(header, "lrllrrrrrrrr", rows)


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
    return f"![{alt}](img/{file_name})"


def machine_section(data):
    info = data["machine"]
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    return f"""## Machine

- CPU: {info["cpu"]}, {info["cores"]} cores; RAM {info["ram_gib"]:.0f} GiB;
  {info["os"]}; no GPU used.
- Versions: {versions}.

The machine is shared with other jobs and has only {info["cores"]} cores, so
single timings are noisy, at times by a factor of two. Every number below is
a **median** over repetitions (`reps`), shown as `median ± IQR/2` (half the
interquartile range). Each repetition times the compared implementations
back to back, rotating which goes first, so that load from other processes
hits them alike; ratios of medians are steadier than the absolute times.
Differences within about 10% are within the noise of this machine."""


def intro(data):
    minutes = data["duration_s"] / 60
    quick = ""
    if data["quick"]:
        quick = (
            "\n\n**This is a `--quick` smoke run**: tiny sizes and 3 repetitions, "
            "to check that everything runs. Its numbers mean little."
        )
    return f"""# Benchmarks

Generated by `{data["command"]}` on {data["machine"]["date"]}, in
{minutes:.1f} minutes (`make bench` runs `python benchmarks/run.py`). Do not
edit by hand: rerun the command to refresh the numbers. Every number is also
in [benchmarks.json](benchmarks.json).{quick}

`keras_ext_embedding.Embedding` ("ours", default configuration:
`invalid_ids="raise"`, plus `invalid_ids="zeros"` for plain lookups) against
`keras.layers.Embedding` ("keras"), both in the same process on the same ids
(a `64 x 32` int32 batch, already a backend tensor) and the same weights,
`output_dim=128`, LoRA rank 8 with a non-zero `B`."""


def speed_sections(data, images):
    sizes = ", ".join(f"{size:,}" for size in data["settings"]["scaling_sizes"])
    return f"""## Speed against Keras

`ours/keras` below 1 means ours is faster; `keras/ours` is the speedup. The
`lookup` rows come from the plain-lookup measurements below, the
`lora_forward` and `lora_train` rows from the vocabulary-scaling ones.

{speed_table(data)}

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

{native_table(data)}"""


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


METHOD = """## How it is measured

- `benchmarks/run.py` starts `benchmarks/bench_backend.py` in one process per
  backend (`KERAS_BACKEND` set, `TF_CPP_MIN_LOG_LEVEL=3`), one after the
  other, for every timing; then one process per (backend, configuration,
  layer) for memory, two at a time (the resident set size of a process does
  not depend on its neighbours). `--quick` runs tiny sizes with few
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
- **lookup / plain lookup**: no LoRA; ours (`invalid_ids` "raise" and
  "zeros"), Keras's and the native op timed together, in rotating order. The
  native op gathers from its own copy of the table (a `tf.Variable` on
  TensorFlow). On TensorFlow, a sparse read of a variable (`tf.gather` on
  it) or a sparse update (an optimizer applying the `IndexedSlices`
  gradient of an embedding) switches the variable to copy-on-read, and from
  then on every dense read copies the whole table. Keras's `ops.take`, which
  both layers use, converts the variable to a tensor (a dense read) before
  its gather, so after one training step both layers' lookups copy the
  table: measured at 1,000,000 rows on this machine, Keras's eager lookup
  went from 0.45 ms to 51 ms, its `tf.function` lookup from 0.25 ms to
  26 ms, and ours alike (keras-team/keras#15376 reports the copy in Keras 2).
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
  not show, so an increase is a lower bound of what the pass allocates."""


def markdown(data, images):
    parts = [
        intro(data),
        headline_section(data),
        machine_section(data),
        speed_sections(data, images),
        memory_sections(data, images),
        METHOD,
    ]
    return "\n\n".join(parts) + "\n"

"""The report's figures, drawn with matplotlib (Agg: no display needed).

`write_all(results, img_dir)` writes one PNG per figure and returns
`{figure: (file name, alt text)}` for the report to reference. Every figure
is drawn only from the measured results; a backend or section a run left
out just leaves its panel empty.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from labels import (
    BACKEND_TITLES,
    DECODING_LABELS,
    LOOKUP_CALL_LABELS,
    MEMORY_LABELS,
    PLOTTED_COMPILED_MODE,
    REVERSE_LABELS,
    SHARDED_LABELS,
    TRAINING_LABELS,
    rows_label,
)
from matplotlib.ticker import FuncFormatter

# A figure is drawn at the width a page shows it, its text read at the size
# it was drawn: a browser shrinking a wider one shrinks its labels with it
# (tests/check_docs_site.py fails a page showing one below 3/4 of its width).
# The benchmarks page hides Material's sidebars: its text is 1,188 px wide in
# a window 1,280 px wide.
DPI = 100
PAGE_WIDTH = 11.5  # inches: 1,150 px
# The figures other pages show too (docs/index.md, docs/guides/sharding.md),
# in their 688 px column beside both sidebars: 900 px is shown at 0.76 of its
# width there, so their text is drawn larger.
QUOTED_WIDTH = 9.0
QUOTED_STYLE = {"font.size": 12, "axes.titlesize": "medium"}
# Above this many decades, a log axis labels its powers of ten only: the 2 and
# 5 between them would overlap.
MINOR_LABEL_DECADES = 2


def minor_labels(axes):
    """Labels minor log ticks at 2 and 5 times a power of ten, where the
    axis spans few enough decades to leave them room."""

    def label(value, _):
        low, high = axes.get_ylim()
        if value <= 0 or low <= 0 or math.log10(high / low) > MINOR_LABEL_DECADES:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if leading in (2, 5) else ""

    return label


def plain_y_labels(axes):
    """Log axes labelled 0.1, 0.2, 0.5, 1 rather than 10^-1, 2x10^-1, ..."""
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(FuncFormatter(minor_labels(axes)))


def size_ticks(axes, sizes):
    """A log axis of vocabulary sizes, ticked at the measured ones (10k, 1M)."""
    axes.set_xticks(sizes, [rows_label(size) for size in sizes])
    axes.set_xticks([], minor=True)


OURS, KERAS = "tab:blue", "tab:orange"
# (implementation, LoRA): (label, colour, line style, marker).
SCALING_LINES = {
    ("ours", False): ("ours", OURS, "-", "o"),
    ("keras", False): ("keras", KERAS, "-", "s"),
    ("ours", True): ("ours + LoRA", OURS, "--", "^"),
    ("keras", True): ("keras + LoRA", KERAS, "--", "v"),
}


def scaling_panel(axes, rows, title, missing="not measured"):
    """Log-log time against rows: ours and Keras's, without and with LoRA."""
    axes.set_title(title)
    if not rows:
        axes.text(0.5, 0.5, missing, ha="center", wrap=True, transform=axes.transAxes)
        axes.set_xticks([])
        axes.set_yticks([])
        return
    for (impl, lora), (label, colour, style, marker) in SCALING_LINES.items():
        points = sorted(
            (row["input_dim"], row[impl]["median_ms"])
            for row in rows
            if row["lora"] == lora
        )
        axes.plot(
            *zip(*points, strict=True), style, color=colour, marker=marker, label=label
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    plain_y_labels(axes)
    size_ticks(axes, sorted({row["input_dim"] for row in rows}))
    axes.grid(True, which="major", alpha=0.3)


SCALING_AXES = ("vocabulary size (rows, output_dim=128)", "median time per call (ms)")


def scaling_rows(result, kind, mode):
    return [
        row
        for row in result.get("vocab_scaling", [])
        if row["kind"] == kind and row["mode"] == mode
    ]


def forward_scaling(results, path):
    """One column per backend; eager on top, Keras's default compiled call
    below."""
    figure, grid = plt.subplots(
        2, len(results), figsize=(QUOTED_WIDTH, 7.5), squeeze=False
    )
    for column, (backend, result) in enumerate(results.items()):
        title = BACKEND_TITLES[backend]
        rows = scaling_rows(result, "forward", "eager")
        scaling_panel(grid[0][column], rows, f"{title}: eager")
        compiled = PLOTTED_COMPILED_MODE.get(backend)
        if compiled:
            rows = scaling_rows(result, "forward", compiled)
            scaling_panel(grid[1][column], rows, f"{title}: {compiled}")
        else:
            note = "not measured: Keras\ndoes not compile on\nPyTorch by default"
            scaling_panel(grid[1][column], [], f"{title}: compiled", note)
    finish(
        figure,
        "Forward pass, 64 x 32 ids: time against vocabulary size",
        path,
        axis_labels=SCALING_AXES,
    )


def train_scaling(results, path):
    figure, grid = plt.subplots(
        1, len(results), figsize=(PAGE_WIDTH, 4.5), squeeze=False
    )
    for column, (backend, result) in enumerate(results.items()):
        rows = [
            row for row in result.get("vocab_scaling", []) if row["kind"] == "train"
        ]
        mode = rows[0]["mode"] if rows else ""
        scaling_panel(grid[0][column], rows, f"{BACKEND_TITLES[backend]}: {mode}")
    finish(
        figure,
        "One training step (Embedding -> GlobalAveragePooling1D, SGD, MSE)",
        path,
        axis_labels=SCALING_AXES,
    )


def grouped_bars(axes, groups, series, rotation=30):
    """Bars of each `series` (label, colour, hatch, values) side by side in
    each group; `values` aligned with `groups`, None for a missing bar."""
    width = 0.8 / len(series)
    for index, (label, colour, hatch, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        positions = [g + offset for g, v in enumerate(values) if v is not None]
        heights = [v for v in values if v is not None]
        axes.bar(
            positions,
            heights,
            width,
            label=label,
            color=colour,
            hatch=hatch,
            edgecolor="white" if hatch else None,
        )
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(
        groups, rotation=rotation, ha="right" if rotation else "center"
    )


def native_floor(results, path):
    """Grouped bars: ours / native and Keras / native per backend and mode,
    one pair of bars per vocabulary size."""
    groups, rows_by_group = [], []
    for backend, result in results.items():
        floor = result.get("native_floor", [])
        for mode in dict.fromkeys(row["mode"] for row in floor):
            groups.append(f"{BACKEND_TITLES[backend]}\n{mode}")
            rows_by_group.append(
                {r["input_dim"]: r for r in floor if r["mode"] == mode}
            )
    sizes = sorted({size for rows in rows_by_group for size in rows})
    series = []
    for index, size in enumerate(sizes):
        hatch = "//" if index else None
        for impl, colour in (("ours", OURS), ("keras", KERAS)):
            values = [
                rows[size][f"{impl}_over_native"] if size in rows else None
                for rows in rows_by_group
            ]
            series.append(
                (f"{impl} / native, {rows_label(size)} rows", colour, hatch, values)
            )
    figure, axes = plt.subplots(figsize=(PAGE_WIDTH, 5.5))
    # Two lines per group ("TensorFlow", "tf.function XLA") fit level.
    grouped_bars(axes, groups, series, rotation=0)
    axes.axhline(1, color="black", linewidth=1, label="native op (1.0)")
    axes.set_yscale("log")
    plain_y_labels(axes)
    axes.set_ylabel("time / time of the native op (log scale)")
    axes.grid(True, axis="y", which="both", alpha=0.3)
    finish(
        figure,
        "Plain lookup against the backend's own gather op",
        path,
        legend_columns=3,
    )


def memory_panel(axes, entries, field, title, ylabel, scale):
    configs = list(dict.fromkeys(entry["config"] for entry in entries))
    series = []
    for impl, colour in (("ours", OURS), ("keras", KERAS)):
        by_config = {e["config"]: e for e in entries if e["impl"] == impl}
        values = [
            by_config[c][field] / (2**20 if field == "table_bytes" else 1)
            if c in by_config
            else None
            for c in configs
        ]
        series.append((impl, colour, None, values))
    grouped_bars(axes, [MEMORY_LABELS[c] for c in configs], series)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.set_yscale(**scale)
    shown = [v for _, _, _, values in series for v in values if v]
    if scale["value"] == "log" and shown:
        # Room below the smallest bar, which would otherwise start at the axis.
        axes.set_ylim(bottom=min(shown) / 2)
    else:
        axes.set_ylim(bottom=0)
    plain_y_labels(axes)
    axes.grid(True, axis="y", alpha=0.3)


def memory(results, path):
    """Per backend: the layer's variable bytes, and the peak RSS increase of
    one forward pass."""
    figure, grid = plt.subplots(2, len(results), figsize=(PAGE_WIDTH, 9), squeeze=False)
    for column, (backend, result) in enumerate(results.items()):
        entries = result.get("memory", [])
        title = BACKEND_TITLES[backend]
        size = f"{rows_label(entries[0]['input_dim'])} rows" if entries else ""
        memory_panel(
            grid[0][column],
            entries,
            "table_bytes",
            f"{title}: table, {size}",
            "variable bytes (MiB, log scale)",
            {"value": "log"},
        )
        memory_panel(
            grid[1][column],
            entries,
            "peak_increase_mb",
            f"{title}: one forward pass",
            "peak RSS increase (MiB, symlog scale)",
            # Increases range from under 1 MiB to gigabytes, and can be 0.
            {"value": "symlog", "linthresh": 1},
        )
    finish(figure, "Memory: table size and peak increase of a forward pass", path)


FLOOR = "tab:gray"


def empty_panel(axes, title, text):
    axes.set_title(title)
    axes.text(0.5, 0.5, text, ha="center", wrap=True, transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def reverse_panel(axes, rows, title):
    """Bars of ours, Keras's and the floor's median ms per table format."""
    if not rows:
        empty_panel(axes, title, "not measured")
        return
    names = list(dict.fromkeys(row["format"] for row in rows))
    by_name = {row["format"]: row for row in rows}
    series = [
        (label, colour, None, [by_name[name][impl]["median_ms"] for name in names])
        for impl, label, colour in (
            ("ours", "ours", OURS),
            ("keras", "keras", KERAS),
            ("floor", "floor: matmul on the float32 table", FLOOR),
        )
    ]
    grouped_bars(axes, [REVERSE_LABELS[name] for name in names], series)
    axes.set_title(title)
    axes.set_yscale("log")
    plain_y_labels(axes)
    axes.set_ylabel("median time per call (ms, log scale)")
    axes.grid(True, axis="y", which="both", alpha=0.3)


def reverse_projection(results, path):
    """One column per backend: one decoding step at the largest size, eager
    on top, the backend's compiled call below; one legend for all panels."""
    # A backend whose run left the section out has no rows (an older JSON).
    rows = [row for r in results.values() for row in r.get("reverse_projection", [])]
    size = max(row["input_dim"] for row in rows)
    figure, grid = plt.subplots(2, len(results), figsize=(PAGE_WIDTH, 9), squeeze=False)
    for column, (backend, result) in enumerate(results.items()):
        decode = [
            row
            for row in result.get("reverse_projection", [])
            if row["hidden"] == "decode" and row["input_dim"] == size
        ]
        modes = list(dict.fromkeys(row["mode"] for row in decode))
        title = BACKEND_TITLES[backend]
        for panel in range(2):
            axes = grid[panel][column]
            if panel < len(modes):
                mode_rows = [row for row in decode if row["mode"] == modes[panel]]
                reverse_panel(axes, mode_rows, f"{title}: {modes[panel]}")
            elif decode:
                empty_panel(axes, f"{title}: compiled", "eager only on PyTorch")
            else:
                empty_panel(axes, title, "not measured")
    finish(
        figure,
        f"Reverse projection (logits), {rows_label(size)} x 512 table, 8 x 512 "
        "hidden states",
        path,
    )


def reverse_memory(results, path):
    """Per backend: the peak RSS increase of one reverse call per format,
    ours and Keras's, against the target (a quarter of the float32 table)."""
    figure, grid = plt.subplots(1, len(results), figsize=(PAGE_WIDTH, 5), squeeze=False)
    for column, (backend, result) in enumerate(results.items()):
        axes = grid[0][column]
        entries = result.get("reverse_memory", [])
        title = BACKEND_TITLES[backend]
        if not entries:
            empty_panel(axes, title, "not measured")
            continue
        names = list(dict.fromkeys(entry["format"] for entry in entries))
        series = []
        for impl, colour in (("ours", OURS), ("keras", KERAS)):
            by_name = {e["format"]: e for e in entries if e["impl"] == impl}
            values = [
                by_name[name]["peak_increase_mb"] if name in by_name else None
                for name in names
            ]
            series.append((impl, colour, None, values))
        grouped_bars(axes, [REVERSE_LABELS[name] for name in names], series)
        axes.axhline(
            entries[0]["limit_mb"],
            color="black",
            linewidth=1,
            linestyle="--",
            label="target: a quarter of the float32 table",
        )
        axes.set_title(f"{title}: {rows_label(entries[0]['input_dim'])} x 512")
        axes.set_ylabel("peak RSS increase (MiB, symlog scale)")
        axes.set_yscale("symlog", linthresh=1)
        axes.set_ylim(bottom=0)
        plain_y_labels(axes)
        axes.grid(True, axis="y", alpha=0.3)
    finish(
        figure, "Peak memory of one reverse projection (8 x 512 hidden states)", path
    )


def decoding(results, path):
    """Grouped bars: ms per generated token, stock and upgraded, per format,
    one panel per backend."""
    figure, grid = plt.subplots(
        1, len(results), figsize=(PAGE_WIDTH, 4.5), squeeze=False
    )
    for column, (backend, result) in enumerate(results.items()):
        axes = grid[0][column]
        rows = result.get("decoding", [])
        title = BACKEND_TITLES[backend]
        if not rows:
            empty_panel(axes, title, "not measured")
            continue
        series = [
            (
                label,
                colour,
                None,
                [row[impl]["median_ms"] / row["new_tokens"] for row in rows],
            )
            for impl, label, colour in (
                ("ours", "replace_embeddings", OURS),
                ("keras", "stock keras-hub", KERAS),
            )
        ]
        grouped_bars(axes, [DECODING_LABELS[row["format"]] for row in rows], series)
        axes.set_title(f"{title}: vocabulary {rows_label(rows[0]['vocab'])}")
        axes.set_ylabel("median time per generated token (ms)")
        axes.set_ylim(bottom=0)
        axes.grid(True, axis="y", alpha=0.3)
    finish(figure, "Greedy decoding, 2-layer GemmaCausalLM (keras-hub)", path)


# Training variants: (colour, line style, marker).
TRAINING_LINES = {
    "keras": (KERAS, "-", "s"),
    "dense": (OURS, "-", "o"),
    "sgd": ("tab:green", "-", "^"),
    "adagrad": ("tab:purple", "-", "v"),
    "adam": ("tab:red", "-", "D"),
    "lora": (OURS, "--", "o"),
    "lora_adam": ("tab:red", "--", "D"),
    "native": ("black", ":", "x"),
}


# The lookup bars' layers, short enough to stand level under their bars.
LOOKUP_BAR_LABELS = {"keras": "keras", "dense": "ours None", "sgd": "ours 'sgd'"}


def training_panel(axes, rows, title):
    """Log-log ms per step against rows, one line per variant, and the
    one-pass floors of a dense and a row-sparse Adam step."""
    axes.set_title(title)
    rows = sorted(rows, key=lambda row: row["input_dim"])
    sizes = [row["input_dim"] for row in rows]
    for name, (colour, style, marker) in TRAINING_LINES.items():
        points = [(r["input_dim"], r[name]["median_ms"]) for r in rows if name in r]
        if points:
            axes.plot(
                *zip(*points, strict=True),
                style,
                color=colour,
                marker=marker,
                label=TRAINING_LABELS[name],
            )
    for floor, style, label in (
        ("dense_adam", "--", "one pass over table + Adam moments"),
        ("row_sparse_adam", ":", "one pass over the batch's rows + moments"),
    ):
        axes.plot(
            sizes,
            [row["floor_ms"][floor] for row in rows],
            style,
            color=FLOOR,
            linewidth=1.5,
            label=label,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    plain_y_labels(axes)
    size_ticks(axes, sizes)
    axes.grid(True, which="major", alpha=0.3)


def training_scaling(results, path):
    """One panel per backend and mode (TensorFlow: without and with XLA),
    two to a row."""
    panels = []
    for backend, result in results.items():
        rows = result.get("training", [])
        modes = list(dict.fromkeys(row["mode"] for row in rows))
        for mode in modes:
            mode_rows = [row for row in rows if row["mode"] == mode]
            panels.append((f"{BACKEND_TITLES[backend]}: {mode}", mode_rows))
        if not modes:
            panels.append((BACKEND_TITLES[backend], []))
    columns = min(2, len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(
        rows_of_panels,
        columns,
        figsize=(PAGE_WIDTH, 4 * rows_of_panels + 1.5),
        squeeze=False,
    )
    cells = [axes for row in grid for axes in row]
    for axes, (title, rows) in zip(cells, panels, strict=False):
        if rows:
            training_panel(axes, rows, title)
        else:
            empty_panel(axes, title, "not measured")
    for axes in cells[len(panels) :]:
        axes.set_visible(False)
    finish(
        figure,
        "One training step (Embedding(V, 128) -> GlobalAveragePooling1D -> "
        "Dense(1), 64 x 32 ids)",
        path,
        legend_columns=3,
        axis_labels=(
            "vocabulary size (rows, output_dim=128)",
            "median time per training step (ms)",
        ),
    )


def lookup_after_training(results, path):
    """Per backend: each layer's lookup time before and after one training
    step with SGD, a group of bars per layer, the eager call's hatched."""
    figure, grid = plt.subplots(1, len(results), figsize=(PAGE_WIDTH, 5), squeeze=False)
    for column, (backend, result) in enumerate(results.items()):
        axes = grid[0][column]
        rows = result.get("lookup_after_training", [])
        title = BACKEND_TITLES[backend]
        if not rows:
            empty_panel(axes, title, "not measured")
            continue
        layers = list(dict.fromkeys(row["variant"] for row in rows))
        calls = list(dict.fromkeys(row["call"] for row in rows))
        by_key = {(row["variant"], row["call"]): row for row in rows}
        series = [
            (
                f"{LOOKUP_CALL_LABELS[call]}: {label}",
                colour,
                "//" if index else None,
                [
                    by_key[layer, call][time]["median_ms"]
                    if (layer, call) in by_key
                    else None
                    for layer in layers
                ],
            )
            for index, call in enumerate(calls)
            for time, label, colour in (
                ("before", "fresh model", "tab:cyan"),
                ("after", "after one train_on_batch (SGD)", "tab:red"),
            )
        ]
        groups = [LOOKUP_BAR_LABELS[layer] for layer in layers]
        grouped_bars(axes, groups, series, rotation=0)
        axes.set_title(f"{title}: {rows_label(rows[0]['input_dim'])} rows")
        axes.set_yscale("log")
        plain_y_labels(axes)
        axes.set_ylabel("median time per lookup (ms, log scale)")
        axes.grid(True, axis="y", which="both", alpha=0.3)
    finish(
        figure,
        "Lookups (64 x 32 ids): predict_on_batch and an eager layer(ids), before "
        "and after one training step",
        path,
        legend_columns=2,
    )


# The sharded section's configurations: colour, marker and its options
# (Keras's hollow and larger: where both hold the same bytes, its marker
# rings ours); its vocabulary sizes, smallest first: line styles.
SHARDED_LINES = {
    "keras_dense_adam": (KERAS, "s", {"markersize": 10, "fillstyle": "none"}),
    "ours_row_sparse_adam": (OURS, "o", {"markersize": 5}),
}
SHARDED_STYLES = ("-", "--", ":")
# The ideal bytes per device: wide and pale, under the measured lines, which
# may hide it.
IDEAL_LINE = {"color": FLOOR, "linewidth": 6, "alpha": 0.35}


def sharded_tables(results, path):
    """Tables sharded by rows (JAX): the bytes the busiest device holds of
    the table and its Adam moments, with the ideal (their total over the
    device count), and the time of a training step, against the device
    count; one line per layer and vocabulary size, the colour for the
    layer, the line style for the size."""
    rows = [row for result in results.values() for row in result.get("sharded", [])]
    sizes = sorted({row["input_dim"] for row in rows})
    counts = sorted({row["devices"] for row in rows})
    figure, (bytes_axes, time_axes) = plt.subplots(1, 2, figsize=(QUOTED_WIDTH, 6))
    for index, size in enumerate(sizes):
        style = SHARDED_STYLES[index % len(SHARDED_STYLES)]
        ideal = {
            row["devices"]: row["ideal_device_bytes"] / 2**20
            for row in rows
            if row["input_dim"] == size
        }
        bytes_axes.plot(
            sorted(ideal),
            [ideal[n] for n in sorted(ideal)],
            style,
            **IDEAL_LINE,
        )
        for config, (colour, marker, marker_options) in SHARDED_LINES.items():
            points = sorted(
                (row["devices"], row)
                for row in rows
                if row["input_dim"] == size and row["config"] == config
            )
            if not points:
                continue
            devices = [n for n, _ in points]
            options = {"color": colour, "marker": marker, **marker_options}
            per_device = [row["max_device_bytes"] / 2**20 for _, row in points]
            bytes_axes.plot(devices, per_device, style, **options)
            times = [row["step"]["median_ms"] for _, row in points]
            time_axes.plot(devices, times, style, **options)
    # The legend names each colour and each line style once (a line per
    # layer and size would be too wide for the figure): lines with no points.
    shown = [c for c in SHARDED_LINES if any(row["config"] == c for row in rows)]
    for config in shown:
        colour, marker, marker_options = SHARDED_LINES[config]
        bytes_axes.plot(
            [],
            [],
            color=colour,
            marker=marker,
            label=SHARDED_LABELS[config],
            **marker_options,
        )
    bytes_axes.plot([], [], label="ideal: total bytes / devices", **IDEAL_LINE)
    for index, size in enumerate(sizes):
        style = SHARDED_STYLES[index % len(SHARDED_STYLES)]
        bytes_axes.plot([], [], style, color="black", label=f"{rows_label(size)} rows")
    for axes, title, ylabel in (
        (
            bytes_axes,
            "Bytes per device: table + Adam moments",
            "most held by one device (MiB, log scale)",
        ),
        (
            time_axes,
            "One train_on_batch",
            "median time per training step (ms, log scale)",
        ),
    ):
        axes.set_title(title)
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts)
        axes.set_xticklabels([str(n) for n in counts])
        axes.set_xticks([], minor=True)
        axes.set_yscale("log")
        plain_y_labels(axes)
        axes.set_ylabel(ylabel)
        axes.grid(True, which="major", alpha=0.3)
    finish(
        figure,
        "Tables sharded by rows with keras.distribution (JAX, output_dim="
        f"{rows[0]['output_dim']})",
        path,
        legend_columns=2,
        axis_labels=("devices (virtual CPU devices sharing the cores)", None),
    )


def finish(figure, title, path, legend_columns=None, axis_labels=None):
    """Titles, lays out and saves the figure. A figure whose first panel has
    no legend of its own gets one below its panels: every line once, in
    `legend_columns` columns (default: two per panel column). `axis_labels`,
    `(x, y)`, label the panels' shared axes once, for the figure (None: the
    panels label their own): a label per panel would take their room."""
    figure.suptitle(title)
    # Every label of every panel, once (a PyTorch panel has a line more).
    shown = {}
    for axes in figure.axes:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            shown.setdefault(label, handle)
    handles, labels = list(shown.values()), list(shown)
    bottom = 0
    if handles and not figure.axes[0].get_legend():
        # Scaling figures: one legend for all panels, which share their lines.
        columns = legend_columns or 2 * figure.axes[0].get_gridspec().ncols
        columns = min(len(handles), columns)
        figure.legend(handles, labels, loc="lower center", ncol=columns)
        # Room for the legend's rows: about a quarter inch each.
        rows = math.ceil(len(handles) / columns)
        bottom = max(0.06, 0.03 + 0.25 * rows / figure.get_figheight())
    x_label, y_label = axis_labels or (None, None)
    if x_label:
        # Above the legend, in the room tight_layout leaves it in `rect`.
        figure.supxlabel(x_label, y=bottom + 0.01, va="bottom")
    if y_label:
        figure.supylabel(y_label)
    figure.tight_layout(rect=(0, bottom, 1, 1))
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


# Other pages show these too, at 0.76 of their width (see QUOTED_WIDTH).
QUOTED = ("vocab_scaling_forward", "sharded_tables")

# name: (draw, alt text, the results section it is drawn from)
FIGURES = {
    "vocab_scaling_forward": (
        forward_scaling,
        "Forward time against vocabulary size",
        "vocab_scaling",
    ),
    "vocab_scaling_train": (
        train_scaling,
        "Training-step time against vocabulary size",
        "vocab_scaling",
    ),
    "native_floor": (
        native_floor,
        "Lookup time relative to the backend's own op",
        "native_floor",
    ),
    "training_scaling": (
        training_scaling,
        "Training-step time against vocabulary size, dense and row-sparse",
        "training",
    ),
    "lookup_after_training": (
        lookup_after_training,
        "Lookup time before and after one training step",
        "lookup_after_training",
    ),
    "sharded_tables": (
        sharded_tables,
        "Bytes per device and training-step time of tables sharded by rows, "
        "against the device count",
        "sharded",
    ),
    "memory": (memory, "Table bytes and peak memory of one forward pass", "memory"),
    "reverse_projection": (
        reverse_projection,
        "Reverse projection time per table format: ours, Keras's and the floor",
        "reverse_projection",
    ),
    "reverse_memory": (
        reverse_memory,
        "Peak memory of one reverse projection per table format",
        "reverse_memory",
    ),
    "decoding": (
        decoding,
        "Greedy decoding time per token, stock keras-hub and replace_embeddings",
        "decoding",
    ),
}


def write_all(results, img_dir):
    """Draws the figures whose section this run measured (`--sections`
    may leave some out); returns {name: (file name, alt text)}."""
    os.makedirs(img_dir, exist_ok=True)
    written = {}
    for name, (draw, alt, section) in FIGURES.items():
        if not any(result.get(section) for result in results.values()):
            continue
        file_name = f"{name}.png"
        with plt.rc_context(QUOTED_STYLE if name in QUOTED else {}):
            draw(results, os.path.join(img_dir, file_name))
        written[name] = (file_name, alt)
    return written

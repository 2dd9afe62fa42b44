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
    MEMORY_LABELS,
    PLOTTED_COMPILED_MODE,
    REVERSE_LABELS,
    rows_label,
)
from matplotlib.ticker import FuncFormatter

DPI = 110


def minor_label(value, _):
    """Labels minor log ticks at 2 and 5 times a power of ten only."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


def plain_y_labels(axes):
    """Log axes labelled 0.1, 0.2, 0.5, 1 rather than 10^-1, 2x10^-1, ..."""
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(FuncFormatter(minor_label))


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
    axes.set_xlabel("vocabulary size (rows, output_dim=128)")
    axes.set_ylabel("median time per call (ms)")
    axes.grid(True, which="major", alpha=0.3)


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
        2, len(results), figsize=(5 * len(results), 8.5), squeeze=False
    )
    for column, (backend, result) in enumerate(results.items()):
        title = BACKEND_TITLES[backend]
        scaling_panel(
            grid[0][column], scaling_rows(result, "forward", "eager"), f"{title}: eager"
        )
        compiled = PLOTTED_COMPILED_MODE.get(backend)
        if compiled:
            rows = scaling_rows(result, "forward", compiled)
            scaling_panel(grid[1][column], rows, f"{title}: {compiled}")
        else:
            note = "not measured: Keras does not\ncompile on PyTorch by default"
            scaling_panel(grid[1][column], [], f"{title}: compiled", note)
    finish(figure, "Forward pass, 64 x 32 ids: time against vocabulary size", path)


def train_scaling(results, path):
    figure, grid = plt.subplots(
        1, len(results), figsize=(5 * len(results), 4.5), squeeze=False
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
    )


def grouped_bars(axes, groups, series):
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
    axes.set_xticklabels(groups, rotation=30, ha="right")


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
    figure, axes = plt.subplots(figsize=(max(8, 1.3 * len(groups) + 3), 5.5))
    grouped_bars(axes, groups, series)
    axes.axhline(1, color="black", linewidth=1, label="native op (1.0)")
    axes.set_yscale("log")
    plain_y_labels(axes)
    axes.set_ylabel("time / time of the native op (log scale)")
    axes.grid(True, axis="y", which="both", alpha=0.3)
    axes.legend(fontsize="small")
    finish(figure, "Plain lookup against the backend's own gather op", path)


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
    axes.legend(fontsize="small")


def memory(results, path):
    """Per backend: the layer's variable bytes, and the peak RSS increase of
    one forward pass."""
    figure, grid = plt.subplots(
        2, len(results), figsize=(5 * len(results), 9), squeeze=False
    )
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
            ("floor", "floor: einsum on the float32 table", FLOOR),
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
    rows = [row for result in results.values() for row in result["reverse_projection"]]
    size = max(row["input_dim"] for row in rows)
    figure, grid = plt.subplots(
        2, len(results), figsize=(5.5 * len(results), 9), squeeze=False
    )
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
    figure, grid = plt.subplots(
        1, len(results), figsize=(5.5 * len(results), 5), squeeze=False
    )
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
        axes.legend(fontsize="small")
    finish(
        figure, "Peak memory of one reverse projection (8 x 512 hidden states)", path
    )


def decoding(results, path):
    """Grouped bars: ms per generated token, stock and upgraded, per format,
    one panel per backend."""
    figure, grid = plt.subplots(
        1, len(results), figsize=(5 * len(results), 5), squeeze=False
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
        axes.legend(fontsize="small")
    finish(figure, "Greedy decoding, 2-layer GemmaCausalLM (keras-hub)", path)


def finish(figure, title, path):
    figure.suptitle(title)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    if handles and not figure.axes[0].get_legend():
        # Scaling figures: one legend for all panels, which share their lines.
        columns = figure.axes[0].get_gridspec().ncols
        figure.legend(
            handles, labels, loc="lower center", ncol=min(len(handles), 2 * columns)
        )
        figure.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


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
        draw(results, os.path.join(img_dir, file_name))
        written[name] = (file_name, alt)
    return written

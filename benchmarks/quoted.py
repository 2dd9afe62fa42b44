"""The measured figures the docs pages quote, kept equal to `docs/benchmarks.json`.

A page quotes a figure between two HTML comments, which GitHub, PyPI and
MkDocs all hide:

    one training step takes <!-- fig training_ms 1000000 keras adam -->...<!-- /fig -->

`fig NAME ARGS` names a function of `FIGURES` and its arguments; the text
between the comments is what that function makes of the JSON document. A
figure on lines of its own (a table) is a block: its text sits between blank
lines, so that Markdown sees the table. An inline figure never starts a
line: a comment there starts an HTML block, which ends the paragraph and
leaves the line's Markdown unrendered. `<!-- fig machine -->` names the
machine and dates of every other figure of its page.

    python benchmarks/quoted.py           # rewrite the figures of every page
    python benchmarks/quoted.py --check   # exit 1 and list the stale pages

`run.py` rewrites the pages after each run it writes into `docs/`, so a bench
run updates every page; tests/test_quoted_figures.py fails when a page
differs from what the JSON gives, or quotes a measured number by hand.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from labels import BACKEND_TITLES, DECODING_LABELS, REVERSE_LABELS
from report import number

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "benchmarks.json"
# Every page that may quote a figure: the README and the site's own pages
# (benchmarks.md is generated whole by report.py; the changelog and
# CONTRIBUTING.md, which shows the markers, quote none).
PAGES = (
    "README.md",
    "docs/index.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/guides").glob("*.md")),
)
MARKER = re.compile(r"<!-- fig (?P<spec>[^>]*?) -->(?P<body>.*?)<!-- /fig -->", re.S)
BACKENDS = ("tensorflow", "jax", "torch")


class Quote:
    """A figure's text and the `(backend, section)` pairs it was read from."""

    def __init__(self, text, *sources):
        self.text = text
        self.sources = set(sources)


def rows(data, backend, section, **match):
    """The rows of `results[backend][section]` whose fields equal `match`."""
    found = [
        row
        for row in data["results"].get(backend, {}).get(section, [])
        if all(row.get(key) == value for key, value in match.items())
    ]
    if not found:
        raise LookupError(
            f"docs/benchmarks.json has no {section} row on {backend} with {match}: "
            "rerun the section (make bench) or change the page's figure"
        )
    return found


def row(data, backend, section, **match):
    (found,) = rows(data, backend, section, **match)
    return found


def ms(value):
    """A time as the pages write it: three significant digits, thousands
    separated ("1,356 ms", "88 ms", "4.35 ms")."""
    if value >= 1000:
        return f"{value:,.0f} ms"
    return number(value, " ms")


def plain(value):
    """A time in milliseconds, its unit left to the table's header."""
    return ms(value).removesuffix(" ms")


def times(value):
    """A ratio: "427x", "3.4x", "0.72x"."""
    if value >= 1000:
        return f"{value:,.0f}x"
    return number(value, "x")


def span(values, unit):
    """The range of `values` in one unit: "1.2-1.3x", or "1.2x" when equal."""
    low, high = (unit(v) for v in (min(values), max(values)))
    if low == high:
        return low
    suffix = "x" if high.endswith("x") else " ms" if high.endswith(" ms") else ""
    return f"{low.removesuffix(suffix)}-{high}"


def per_backend(values, unit):
    """`{backend: value}` as "TensorFlow 88 ms, JAX 380 ms, PyTorch 422 ms"."""
    return ", ".join(f"{BACKEND_TITLES[b]} {unit(v)}" for b, v in values.items())


# -- The figures. Each takes the JSON document and the marker's arguments
# (strings) and returns a Quote. Sections are those of `benchmarks/run.py
# --sections`, which the JSON's `updates` name.


def lora_forward_ms(data, impl, mode="eager"):
    """One forward pass of a LoRA layer at the headline size, per backend:
    the vocabulary-scaling section's rows."""
    size = data["headline"]["lora_input_dim"]
    values = {
        b: row(
            data,
            b,
            "vocab_scaling",
            kind="forward",
            lora=True,
            mode=mode,
            input_dim=size,
        )[impl]["median_ms"]
        for b in BACKENDS
    }
    return Quote(per_backend(values, ms), *((b, "vocab_scaling") for b in BACKENDS))


def lora_speedup(data, which, mode="eager"):
    """Keras's LoRA time over ours at the headline size: `which` is
    "forward" or "train"."""
    values = {}
    for b in BACKENDS:
        entry = data["headline"]["backends"][b]["lora_speedup"][which]
        values[b] = entry if which == "train" else entry.get(mode)
    values = {b: v for b, v in values.items() if v is not None}
    return Quote(per_backend(values, times), *((b, "vocab_scaling") for b in values))


def lookup_ms(data, case, impl, mode="eager"):
    """A lookup of the speed table (`case` with "_" for spaces, e.g.
    int4_block_128_lookup) at its size, per backend."""
    case = case.replace("_", " ")
    values = {
        b: row(data, b, "speed", case=case, mode=mode, variant="raise")[impl][
            "median_ms"
        ]
        for b in BACKENDS
    }
    return Quote(
        per_backend(values, ms), *((b, section_of_case(case)) for b in BACKENDS)
    )


def section_of_case(case):
    # The speed table's rows come from three sections (bench_backend.py).
    if case == "lookup":
        return "native_floor"
    if "LoRA forward vs keras int4" in case or case.startswith("LoRA"):
        return "vocab_scaling"
    return "quantized"


def compiled_lookup_ratio(data):
    """Ours over Keras's for a compiled plain lookup, over backends and
    compiled modes (PyTorch's torch.compile aside: see the bench notes)."""
    values = [
        r["ratio"]
        for b in ("tensorflow", "jax")
        for r in data["results"][b]["speed"]
        if r["case"] == "lookup" and r["mode"] != "eager" and r["variant"] == "raise"
    ]
    return Quote(
        span(values, number), *((b, "native_floor") for b in ("tensorflow", "jax"))
    )


def eager_lookup_ratio(data, case="lookup"):
    """Ours over Keras's for an eager lookup of `case`, over backends."""
    case = case.replace("_", " ")
    values = [
        row(data, b, "speed", case=case, mode="eager", variant="raise")["ratio"]
        for b in BACKENDS
    ]
    return Quote(span(values, number), *((b, section_of_case(case)) for b in BACKENDS))


def compiled_case_ratio(data, case):
    """Ours over Keras's for `case` compiled (TensorFlow's two modes, JAX's
    jax.jit), over those."""
    case = case.replace("_", " ")
    values = [
        r["ratio"]
        for b in ("tensorflow", "jax")
        for r in data["results"][b]["speed"]
        if r["case"] == case and r["mode"] != "eager"
    ]
    return Quote(
        span(values, number),
        *((b, section_of_case(case)) for b in ("tensorflow", "jax")),
    )


def table_ratio(data, config):
    """float32 bytes over a quantized table's bytes (`config` as the
    table_bytes rows name it, "_" for spaces: int8, int4_per_row,
    int4_block_128)."""
    entry = row(data, "jax", "table_bytes", config=config.replace("_", " "))
    return Quote(
        times(entry["float32_bytes"] / entry["ours_bytes"]), ("jax", "quantized")
    )


def training_ms(data, size, *variants):
    """One training step at `size` rows, per backend and mode: Keras's dense
    Adam -> ours (`variants`: training-section names)."""
    size = int(size)
    cells = []
    sources = []
    for b in BACKENDS:
        for entry in rows(data, b, "training", input_dim=size):
            mode = entry["mode"].removeprefix("train_on_batch (").removesuffix(")")
            # TensorFlow: the XLA step, the one Keras's big-table users want.
            if b == "tensorflow" and "XLA" not in mode:
                continue
            label = BACKEND_TITLES[b] + (" (XLA)" if b == "tensorflow" else "")
            cells.append(
                f"{label} " + " -> ".join(ms(entry[v]["median_ms"]) for v in variants)
            )
            sources.append((b, "training"))
    return Quote(", ".join(cells), *sources)


def training_table(data, size):
    """The big-table training guide's table: one step at `size` rows."""
    size = int(size)
    lines = [
        '| backend | Keras, Adam (ms) | ours `optimizer="adam"` (ms) | '
        "Keras time / ours | at 4M rows: Keras -> ours |",
        "|---|---:|---:|---:|---:|",
    ]
    sources = []
    for b in BACKENDS:
        for entry in rows(data, b, "training", input_dim=size):
            mode = entry["mode"]
            label = BACKEND_TITLES[b]
            if b == "tensorflow":
                label += (
                    ", `jit_compile=True`" if "XLA" in mode else ", `jit_compile=False`"
                )
            big = row(data, b, "training", input_dim=4 * size, mode=mode)
            keras_ms, ours_ms = entry["keras"]["median_ms"], entry["adam"]["median_ms"]
            lines.append(
                f"| {label} | {ms(keras_ms).removesuffix(' ms')} | "
                f"{ms(ours_ms).removesuffix(' ms')} | {times(keras_ms / ours_ms)} | "
                f"{ms(big['keras']['median_ms']).removesuffix(' ms')} -> "
                f"{ms(big['adam']['median_ms'])} |"
            )
            sources.append((b, "training"))
    return Quote("\n".join(lines), *sources)


def training_step(data, size, backend, mode, variant):
    """One training step's median: `mode` is the mode's word in the JSON
    ("XLA", "tf.function", "jax.jit", "eager")."""
    size = int(size)
    for entry in rows(data, backend, "training", input_dim=size):
        name = entry["mode"].removeprefix("train_on_batch (").removesuffix(")")
        if name.removeprefix("tf.function ") == mode or name == mode:
            return Quote(ms(entry[variant]["median_ms"]), (backend, "training"))
    raise LookupError(f"no training row on {backend} in mode {mode!r} at {size:,} rows")


def lookup_after(data, variant, call):
    """TensorFlow: a lookup before -> after one SGD step, at the section's
    size."""
    entry = row(data, "tensorflow", "lookup_after_training", variant=variant, call=call)
    text = f"{plain(entry['before']['median_ms'])} -> {ms(entry['after']['median_ms'])}"
    return Quote(text, ("tensorflow", "training"))


def reverse_table(data):
    """The language-model guide's table: a decoding step's reverse
    projection, eager, ours (Keras's), per format and backend."""
    header = [
        "format",
        *(f"{BACKEND_TITLES[b]} (ms)" for b in BACKENDS),
        "ours / Keras",
    ]
    lines = [
        f"| {' | '.join(header)} |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for name, label in REVERSE_LABELS.items():
        cells = []
        ratios = []
        for b in BACKENDS:
            entry = reverse_row(data, b, name, "eager")
            cells.append(
                f"{plain(entry['ours']['median_ms'])} "
                f"({plain(entry['keras']['median_ms'])})"
            )
            ratios.append(entry["ratio"])
        lines.append(f"| {label} | {' | '.join(cells)} | {span(ratios, number)} |")
    sources = [(b, "reverse_projection") for b in BACKENDS]
    return Quote("\n".join(lines), *sources)


def reverse_speedup(data, name, mode="eager"):
    """Keras's time over ours for a decoding step's reverse projection, per
    backend (eager, or the backend's compiled mode: "compiled")."""
    values = {}
    for b in BACKENDS:
        speedups = data["headline"]["backends"][b]["reverse"]["speedup"]
        if mode == "eager":
            values[b] = speedups["eager"][name]
        else:
            compiled = [m for m in speedups if m != "eager"]
            if compiled:
                values[b] = speedups[compiled[-1]][name]
    return Quote(
        per_backend(values, times), *((b, "reverse_projection") for b in values)
    )


def reverse_row(data, backend, name, mode):
    """A decoding step's reverse-projection row at the headline size; `mode`
    "eager" or "compiled" (the backend's last compiled mode)."""
    size = data["headline"]["reverse_input_dim"]
    found = rows(
        data,
        backend,
        "reverse_projection",
        format=name,
        input_dim=size,
        hidden="decode",
    )
    if mode == "eager":
        (entry,) = [r for r in found if r["mode"] == "eager"]
    else:
        entry = [r for r in found if r["mode"] != "eager"][-1]
    return entry


def reverse_ms(data, backend, name, impl, mode="eager"):
    """One decoding step's reverse projection: `impl`'s milliseconds."""
    entry = reverse_row(data, backend, name, mode)
    return Quote(ms(entry[impl]["median_ms"]), (backend, "reverse_projection"))


def reverse_floor_ms(data):
    """The floor of a decoding step's reverse projection, per backend."""
    values = {
        b: reverse_row(data, b, "float32", "eager")["floor"]["median_ms"]
        for b in BACKENDS
    }
    return Quote(
        per_backend(values, ms), *((b, "reverse_projection") for b in BACKENDS)
    )


def reverse_memory_max(data, impl):
    """The most memory one reverse call added, over formats and backends."""
    values = [
        entry["peak_increase_mb"]
        for b in BACKENDS
        for entry in data["results"][b].get("reverse_memory", [])
        if entry["impl"] == impl
    ]
    return Quote(
        f"{max(values):,.0f} MiB", *((b, "reverse_projection") for b in BACKENDS)
    )


def decoding_speedup(data, name):
    """keras-hub `generate`: Keras's time per token over ours, per backend."""
    values = {
        b: data["headline"]["backends"][b]["decoding_speedup"][name] for b in BACKENDS
    }
    return Quote(
        per_backend(values, times), *((b, "reverse_projection") for b in BACKENDS)
    )


def summary_table(data):
    """The README's table of ratios, per backend."""
    h = data["headline"]
    backends = h["backends"]
    header = ["", *(BACKEND_TITLES[b] for b in BACKENDS)]
    lines = [f"| {' | '.join(header)} |", "|---|" + "---:|" * len(BACKENDS)]

    def line(label, value):
        lines.append(
            f"| {label} | {' | '.join(value(backends[b]) for b in BACKENDS)} |"
        )

    line(
        "LoRA forward pass, eager",
        lambda e: times(e["lora_speedup"]["forward"]["eager"]),
    )
    line("LoRA training step", lambda e: times(e["lora_speedup"]["train"]))
    line(
        'training step, Adam: dense against `optimizer="adam"`',
        lambda e: " / ".join(times(v) for v in e["training_speedup"].values()),
    )
    for name in ("float32_lora", "int8", "int4_128"):
        line(
            f"LM head logits, {REVERSE_LABELS[name]}, eager",
            lambda e, name=name: times(e["reverse"]["speedup"]["eager"][name]),
        )
    for name in ("float32_lora", "int8", "int4"):
        line(
            f"keras-hub `generate` per token, {DECODING_LABELS[name]}",
            lambda e, name=name: times(e["decoding_speedup"][name]),
        )
    sources = [
        (b, s)
        for b in BACKENDS
        for s in ("vocab_scaling", "training", "reverse_projection")
    ]
    return Quote("\n".join(lines), *sources)


FIGURES = {
    function.__name__: function
    for function in (
        lora_forward_ms,
        lora_speedup,
        lookup_ms,
        compiled_lookup_ratio,
        eager_lookup_ratio,
        compiled_case_ratio,
        table_ratio,
        training_ms,
        training_table,
        training_step,
        lookup_after,
        reverse_table,
        reverse_speedup,
        reverse_floor_ms,
        reverse_ms,
        reverse_memory_max,
        decoding_speedup,
        summary_table,
    )
}


# -- Where each figure was measured.


def measured_on(data, backend, section):
    """`(machine, date)` of the run that last measured `section` on
    `backend`: the latest update naming both, else the run itself."""
    base = data["machine"]
    base_machine = f"{base['cores']}-core {base['cpu']}"
    for update in reversed(data.get("updates", [])):
        if backend in update["backends"] and section in update["sections"]:
            if "cpu" in update:
                return f"{update['cores']}-core {update['cpu']}", update["date"]
            return base_machine, update["date"]
    return base_machine, base["date"]


def machine_line(data, sources):
    """The machine(s) and dates behind `sources`, to follow "measured by
    `make bench` on": one machine, or several with the sections each
    measured."""
    where = {}
    for backend, section in sorted(sources):
        machine, date = measured_on(data, backend, section)
        where.setdefault(machine, {"dates": set(), "sections": set()})
        where[machine]["dates"].add(date.split()[0])
        where[machine]["sections"].add(section.replace("_", " "))
    quick = " in a `--quick` smoke run, whose numbers mean little" * data["quick"]
    if len(where) == 1:
        ((machine, seen),) = where.items()
        dates = sorted(seen["dates"])
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        return f"a {machine} (CPU only), {when}{quick}"
    parts = "; ".join(
        f"{', '.join(sorted(seen['sections']))} on a {machine} "
        f"({', '.join(sorted(seen['dates']))})"
        for machine, seen in sorted(where.items())
    )
    return f"several machines ({parts}){quick}"


# -- Pages.

# What reads as a measured figure: a time, a ratio, a size or a share
# ("88 ms", "1.5x", "98 MiB", "27 GB/s", "13%"), not a shape ("64x32",
# "1M x 128").
MEASURED = re.compile(
    r"\b\d[\d,.]*(?:\s?(?:ms|µs|us|s|MiB|GiB|KiB|MB|GB|GB/s)\b|x\b|%)"
)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def hand_written(text):
    """`(line number, figure)` of every measured-looking number of `text`
    outside the figures and the code blocks."""
    blanked = MARKER.sub(lambda m: "\n" * m[0].count("\n"), text)
    blanked = FENCE.sub(lambda m: "\n" * m[0].count("\n"), blanked)
    return [
        (blanked.count("\n", 0, found.start()) + 1, found[0])
        for found in MEASURED.finditer(blanked)
    ]


def quote(data, spec):
    name, *args = spec.split()
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(sorted(FIGURES))}")
    return FIGURES[name](data, *args)


def render(text, data):
    """`text` with every figure rewritten from `data`."""
    sources = set()

    def replace(match, machine=None):
        spec = match["spec"].strip()
        if spec == "machine":
            if machine is None:
                return match[0]
            body = machine
        else:
            found = quote(data, spec)
            sources.update(found.sources)
            body = found.text
        if match["body"].startswith("\n"):
            body = f"\n\n{body}\n\n"
        return f"<!-- fig {spec} -->{body}<!-- /fig -->"

    text = MARKER.sub(replace, text)
    if sources:
        line = machine_line(data, sources)
        text = MARKER.sub(lambda m: replace(m, line), text)
    return text


def misplaced(text):
    """`(line number, marker)` of every figure Markdown would not render in
    place: a figure that starts its line must be a block (its marker alone
    on the line, a blank line after it). A comment that starts a line starts
    an HTML block, which ends the paragraph before it and leaves the
    Markdown of its line unrendered."""
    found = []
    for match in MARKER.finditer(text):
        start = text.rfind("\n", 0, match.start()) + 1
        starts_line = not text[start : match.start()].strip()
        if starts_line and not match["body"].startswith("\n"):
            found.append((text.count("\n", 0, match.start()) + 1, match[0][:60]))
    return found


def rendered_pages(data, root=ROOT):
    """`{page: (current text, text from data)}` for every page of PAGES."""
    pages = {}
    for page in PAGES:
        path = root / page
        if path.exists():
            text = path.read_text()
            try:
                pages[page] = (text, render(text, data))
            except (LookupError, KeyError) as error:
                raise type(error)(f"{page}: {error}") from error
    return pages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list stale pages")
    parser.add_argument("--json", type=Path, default=JSON)
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    stale = []
    for page, (text, new) in rendered_pages(data).items():
        if text != new:
            stale.append(page)
            if not args.check:
                (ROOT / page).write_text(new)
    verb = "differ from" if args.check else "rewritten from"
    print(f"{len(stale)} pages {verb} {args.json.name}: {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

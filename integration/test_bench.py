"""`make bench` runs: a `--quick` smoke run writes every output file.

Only that the benchmark suite runs end to end and writes what the docs site
needs is checked here, never a timing: timings depend on the machine and its
load.
"""

import json
import re
import subprocess
import sys

import pytest
from processes import BACKENDS, KERAS_HUB_UNSUPPORTED, ROOT, run_under

RUN = ROOT / "benchmarks" / "run.py"
SECTIONS = (
    "speed",
    "native_floor",
    "table_bytes",
    "vocab_scaling",
    "training",
    "lookup_after_training",
    "bags",
    "bags_training",
    "bags_memory",
    "memory",
    "reverse_projection",
    "reverse_memory",
    "decoding",
)
FIGURES = (
    "vocab_scaling_forward",
    "vocab_scaling_train",
    "training_scaling",
    "lookup_after_training",
    "native_floor",
    "memory",
    "reverse_projection",
    "reverse_memory",
    "decoding",
)
# The reverse projection's table formats and modes each backend measures.
REVERSE_FORMATS = {"float32", "float32_lora", "int8", "int4", "int4_128"}
REVERSE_MODES = {
    "tensorflow": {"eager", "tf.function XLA"},
    "jax": {"eager", "jax.jit"},
    "torch": {"eager"},
}
DECODING_FORMATS = {"float32", "float32_lora", "int8", "int4"}
# The training section's variants and modes per backend.
TRAINING_VARIANTS = {"keras", "dense", "sgd", "adagrad", "adam", "lora", "lora_adam"}
TRAINING_MODES = {
    "tensorflow": {
        "train_on_batch (tf.function)",
        "train_on_batch (tf.function XLA)",
    },
    "jax": {"train_on_batch (jax.jit)"},
    "torch": {"train_on_batch (eager)"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if KERAS_HUB_UNSUPPORTED:
        pytest.skip(f"its decoding section runs keras-hub: {KERAS_HUB_UNSUPPORTED}")
    tmp_path = tmp_path_factory.mktemp("bench")
    # run.py starts a process per backend itself; KERAS_BACKEND here only
    # matters for its own imports, which load no backend.
    args = ["--quick", "--backends", ",".join(BACKENDS), "--output-dir", tmp_path]
    run_under("tensorflow", RUN, *args, timeout=900)
    return tmp_path


def redrawn(data, tmp_path):
    """The output directory of `--from-json` on the JSON document `data`."""
    source, out = tmp_path / "source.json", tmp_path / "redrawn"
    source.write_text(json.dumps(data))
    run_under("tensorflow", RUN, "--from-json", source, "--output-dir", out)
    return out


def test_quick_benchmark_writes_json_markdown_and_figures(quick_run):
    tmp_path = quick_run
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["quick"] is True
    assert set(data["results"]) == set(BACKENDS)
    for backend in BACKENDS:
        for section in SECTIONS:
            assert data["results"][backend].get(section), (backend, section)

    page = (tmp_path / "benchmarks.md").read_text()
    assert "[benchmarks.json](benchmarks.json)" in page
    for name in FIGURES:
        assert f"(img/{name}.png)" in page, name
        image = tmp_path / "img" / f"{name}.png"
        assert image.read_bytes().startswith(PNG_SIGNATURE), image
    # The page is part of the docs site: no links out of its directory.
    assert not re.search(r"\]\((\.\./|/)", page)


def test_quick_benchmark_measures_every_reverse_format_and_mode(quick_run):
    data = json.loads((quick_run / "benchmarks.json").read_text())
    for backend in BACKENDS:
        result = data["results"][backend]
        rows = result["reverse_projection"]
        assert {row["format"] for row in rows} == REVERSE_FORMATS, backend
        assert {row["mode"] for row in rows} == REVERSE_MODES[backend], backend
        assert {row["hidden"] for row in rows} == {"decode", "prefill"}, backend
        # A quick run's tiny sizes neither meet nor miss a target.
        assert all(row["met"] is None for row in rows), backend
        memory = result["reverse_memory"]
        assert {(e["format"], e["impl"]) for e in memory} == {
            (name, impl) for name in REVERSE_FORMATS for impl in ("ours", "keras")
        }, backend
        decoding = result["decoding"]
        assert {row["format"] for row in decoding} == DECODING_FORMATS, backend
        # Greedy decoding: the upgraded model generates the stock one's tokens.
        assert all(row["same_tokens"] for row in decoding), (backend, decoding)
    page = (quick_run / "benchmarks.md").read_text()
    assert "## Reverse projection: ReversibleEmbedding logits" in page
    assert "## Greedy decoding with a keras-hub causal LM" in page


def test_quick_benchmark_measures_every_training_variant_and_mode(quick_run):
    data = json.loads((quick_run / "benchmarks.json").read_text())
    for backend in BACKENDS:
        result = data["results"][backend]
        rows = result["training"]
        assert {row["mode"] for row in rows} == TRAINING_MODES[backend], backend
        # PyTorch also times its own sparse embedding training, the floor.
        variants = TRAINING_VARIANTS | ({"native"} if backend == "torch" else set())
        for row in rows:
            assert variants <= set(row), (backend, row["mode"])
            assert set(row["over_keras"]) == variants, (backend, row["mode"])
            assert row["floor_ms"]["row_sparse_adam"] > 0, backend
        lookups = result["lookup_after_training"]
        assert {(row["variant"], row["call"]) for row in lookups} == {
            (variant, call)
            for variant in ("keras", "dense", "sgd")
            for call in ("predict_on_batch", "eager")
        }, backend
        headline = data["headline"]["backends"][backend]["training_speedup"]
        assert set(headline) == TRAINING_MODES[backend], backend
    page = (quick_run / "benchmarks.md").read_text()
    assert "## Training big tables" in page
    assert "## Lookups after a training step" in page


def test_run_help_names_the_options():
    output = run_under("tensorflow", RUN, "--help", timeout=60)
    for option in ("--quick", "--output-dir", "--backends", "--from-json"):
        assert option in output


def test_a_run_of_some_sections_draws_only_their_figures(quick_run, tmp_path):
    # What `--sections quantized` leaves: no scaling, floor or memory data.
    data = json.loads((quick_run / "benchmarks.json").read_text())
    dropped = ("vocab_scaling", "native_floor", "memory")
    dropped += ("reverse_projection", "reverse_memory", "decoding")
    dropped += ("training", "lookup_after_training")
    for result in data["results"].values():
        for section in dropped:
            result.pop(section)
    out = redrawn(data, tmp_path)

    assert not (out / "img").exists() or not list((out / "img").iterdir())
    page = (out / "benchmarks.md").read_text()
    assert page.count("Figure not drawn: this run did not measure its section") == 9
    assert "Not measured in this run (`--sections` left `reverse_projection`" in page
    assert page.count("Not measured in this run (`--sections` left `training`") == 2
    assert "(img/" not in page


def test_a_json_from_before_the_reverse_section_still_renders(quick_run, tmp_path):
    # docs/benchmarks.json of an earlier run: no reverse or training
    # sections, settings or headline entries.
    data = json.loads((quick_run / "benchmarks.json").read_text())
    for result in data["results"].values():
        for section in ("reverse_projection", "reverse_memory", "decoding"):
            result.pop(section)
        for section in ("training", "lookup_after_training"):
            result.pop(section)
    for key in ("reverse_input_dim", "decoding_vocab", "training_input_dim"):
        data["headline"].pop(key)
    for entry in data["headline"]["backends"].values():
        entry.pop("reverse")
        entry.pop("decoding_speedup")
        entry.pop("training_speedup")
    data["settings"] = {
        k: v
        for k, v in data["settings"].items()
        if not k.startswith(
            ("reverse", "decoding", "training", "after_training", "bandwidth")
        )
    }
    page = (redrawn(data, tmp_path) / "benchmarks.md").read_text()
    assert "(img/vocab_scaling_forward.png)" in page
    assert "(img/reverse_projection.png)" not in page
    assert "(img/training_scaling.png)" not in page
    assert "Not measured in this run (`--sections` left `training`" in page
    assert "Keras dense Adam time /" not in page


def test_update_remeasures_some_sections_and_keeps_the_rest(quick_run, tmp_path):
    source = tmp_path / "earlier.json"
    source.write_text((quick_run / "benchmarks.json").read_text())
    before = json.loads(source.read_text())
    out = tmp_path / "out"
    args = ["--quick", "--backends", "torch", "--sections", "native_floor"]
    run_under("torch", RUN, *args, "--update", source, "--output-dir", out)

    data = json.loads((out / "benchmarks.json").read_text())
    (update,) = data["updates"]
    assert update["backends"] == ["torch"]
    assert update["sections"] == ["native_floor"]
    assert "--update" in update["command"]
    # The torch floor was measured again (medians of fresh timings), and
    # nothing else moved.
    torch_before, torch_after = before["results"]["torch"], data["results"]["torch"]
    assert torch_after["native_floor"] != torch_before["native_floor"]
    assert len(torch_after["native_floor"]) == len(torch_before["native_floor"])
    for name in set(torch_before) - {"native_floor", "speed"}:
        assert torch_after[name] == torch_before[name], name
    for backend in ("tensorflow", "jax"):
        assert data["results"][backend] == before["results"][backend]
    assert update["cpu"] == data["machine"]["cpu"]
    page = (out / "benchmarks.md").read_text()
    assert "measured native_floor again on torch" in page
    assert "on another machine" not in page
    # An update from another CPU says so on the page.
    data["updates"][0]["cpu"] = "Another CPU"
    page = (redrawn(data, tmp_path) / "benchmarks.md").read_text()
    assert "on another machine: Another CPU" in page


def test_update_refuses_a_json_of_the_other_kind(quick_run, tmp_path):
    earlier = quick_run / "benchmarks.json"
    args = ["--sections", "native_floor", "--update", earlier, "--output-dir", tmp_path]
    done = subprocess.run(
        [sys.executable, RUN, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "is from a --quick run; run with the same --quick setting" in done.stderr
    assert not (tmp_path / "benchmarks.json").exists()


@pytest.mark.skipif("jax" not in BACKENDS, reason="keras.distribution shards on JAX")
def test_quick_sharded_section_measures_each_device_count(tmp_path):
    # Left out of a --quick run unless named: it starts a process of its own
    # with 8 virtual devices.
    args = ["--quick", "--sections", "sharded", "--backends", "jax"]
    run_under("tensorflow", RUN, *args, "--output-dir", tmp_path, timeout=600)
    results = json.loads((tmp_path / "benchmarks.json").read_text())["results"]
    runs = results["jax"]["sharded"]
    configs = {"keras_dense_adam", "ours_row_sparse_adam"}
    assert {(r["config"], r["devices"]) for r in runs} == {
        (config, n) for config in configs for n in (1, 8)
    }
    for run in runs:
        # The table and both Adam moments, each device holding its share.
        assert len(run["variables"]) == 3
        assert run["over_ideal"] <= 1.1
        assert run["step"]["median_ms"] > 0
        if run["devices"] == 8:
            assert all("'model'" in v["spec"] for v in run["variables"])
    assert (
        (tmp_path / "img" / "sharded_tables.png").read_bytes().startswith(PNG_SIGNATURE)
    )
    assert "## Tables sharded by rows" in (tmp_path / "benchmarks.md").read_text()

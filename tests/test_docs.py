"""Every example of the documentation runs, and prints what the page says.

The guides' code blocks (`README.md`, `docs/index.md`, `docs/guides/*.md`) and the
docstring examples of the public API (shown on the API reference page) run
on the active backend; the suite runs once per backend, so each example runs
on TensorFlow, JAX and PyTorch. The site itself is built by `make docs`
(`mkdocs build --strict`), which `make test` runs.
"""

import contextlib
import doctest
import io
import os
import pathlib
import re
import subprocess
import sys
import warnings

import docs_examples
import keras
import numpy as np
import pytest

import keras_ext_embedding

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
PUBLIC = [
    keras_ext_embedding.Embedding,
    keras_ext_embedding.EmbeddingBag,
    keras_ext_embedding.InvalidIdError,
    keras_ext_embedding.ReversibleEmbedding,
    keras_ext_embedding.SharedEmbedding,
    keras_ext_embedding.replace_embeddings,
    keras_ext_embedding.shard_embeddings,
]


def page_id(page):
    return str(page.relative_to(ROOT))


@pytest.fixture
def fresh_global_state():
    """Examples may set a global dtype policy or distribution: undo it."""
    yield
    keras.config.set_dtype_policy("float32")
    keras.distribution.set_distribution(None)
    keras.backend.clear_session()


def test_every_guide_has_examples():
    assert len(PAGES) >= 10
    for page in PAGES:
        assert docs_examples.runnable(page.read_text()), f"{page_id(page)} runs nothing"


def keras_hub_incompatibility():
    """Why keras-hub cannot run here, when it cannot be imported with a Keras
    newer than the pinned one (keras-hub 0.32.0 imports a private name that
    the Keras 3.16 nightlies removed); None when it can, and on the pinned
    Keras, where a failing import is an error."""
    major, minor = (int(part) for part in keras.version().split(".")[:2])
    if (major, minor) < (3, 16):
        return None
    try:
        import keras_hub  # noqa: F401
    except ImportError as error:
        return f"keras-hub does not run on Keras {keras.version()}: {error}"
    return None


# Keras's RNN layers consume a mask but, from the Keras 3.16 nightlies on, say
# `supports_masking = False` and warn that they drop it (after Keras's own
# Embedding too): Keras's warning, not about this layer.
@pytest.mark.filterwarnings(
    r"ignore:Layer '\w+' \(of type (LSTM|GRU)\) was passed an input with a mask"
    ":UserWarning"
)
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_guide_examples_run_and_print_what_the_page_says(
    page, tmp_path, monkeypatch, fresh_global_state
):
    monkeypatch.chdir(tmp_path)  # examples save files
    namespace = {"__name__": "__docs__"}
    for block in docs_examples.runnable(page.read_text()):
        where = f"{page_id(page)}:{block.line}"
        if "import keras_hub" in block.source and keras_hub_incompatibility():
            # The blocks after it build on it: the page stops here.
            pytest.skip(f"{where} and after: {keras_hub_incompatibility()}")
        if block.language == "bash":
            # A block that sets KERAS_BACKEND itself runs its own backends
            # whatever this suite's: once, in the run of the first it names.
            pinned = re.search(r"KERAS_BACKEND=(\w+)", block.source)
            if pinned and pinned.group(1) != keras.config.backend():
                continue
            run_bash(block, where, tmp_path)
        else:
            run_python(block, where, namespace)


def run_python(block, where, namespace):
    code, expectations = docs_examples.instrument(block, where)
    printed = {}

    def docs_print(index, *args, **kwargs):
        buffer = io.StringIO()
        print(*args, **kwargs, file=buffer)
        printed[index] = printed.get(index, "") + buffer.getvalue()

    namespace["__docs_print__"] = docs_print
    with warnings.catch_warnings():
        if keras.config.backend() == "torch":
            # The export guide traces a model: PyTorch's tracer warns about
            # every Python value it records as a constant (the mask's 0, the
            # layer's host check of the sample ids, which the guide explains).
            import torch

            warnings.simplefilter("ignore", torch.jit.TracerWarning)
        exec(code, namespace)
    for index, want in expectations:
        assert want is not None, (
            f"{where}: print call #{index + 1} of this block does not say what it "
            "prints; add a `# output` comment after it or below it"
        )
        if index in printed:  # not every branch runs on every backend
            assert docs_examples.matches(want, printed[index]), (
                f"{where}: print call #{index + 1} printed\n{printed[index]}"
                f"but the page says\n{want}"
            )


def run_bash(block, where, cwd):
    # `python` in a guide is the interpreter running this suite.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.source],
        cwd=cwd,
        env={**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
    want = docs_examples.bash_expectations(block)
    assert docs_examples.matches(want, done.stdout), (
        f"{where}: printed\n{done.stdout}but the page says\n{want}"
    )


def docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for obj in PUBLIC:
        found.extend(t for t in finder.find(obj, obj.__name__) if t.examples)
    return found


@pytest.mark.parametrize("example", docstring_examples(), ids=lambda t: t.name)
def test_docstring_examples(example, tmp_path, monkeypatch, fresh_global_state):
    monkeypatch.chdir(tmp_path)
    example.globs = {
        "keras": keras,
        "np": np,
        "keras_ext_embedding": keras_ext_embedding,
    }
    runner = doctest.DocTestRunner(optionflags=docs_examples.OPTIONS)
    report = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        result = runner.run(example, out=report.write)
    assert result.attempted > 0
    assert result.failed == 0, report.getvalue()


def test_docstring_examples_cover_the_public_api():
    names = {t.name for t in docstring_examples()}
    assert {
        "Embedding",
        "Embedding.enable_lora",
        "Embedding.merge_lora",
        "Embedding.quantize",
        "replace_embeddings",
        "shard_embeddings",
    } <= names


def test_home_page_and_readme_name_both_layers_and_every_guide():
    guides = sorted(p.stem for p in (DOCS / "guides").glob("*.md"))
    home = (DOCS / "index.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for layer in ("Embedding", "ReversibleEmbedding", "EmbeddingBag"):
        assert f"keras_ext_embedding.{layer}`" in home, layer
    for guide in guides:
        assert f"(guides/{guide}.md)" in home, f"docs/index.md omits {guide}"
        assert f"/guides/{guide}/)" in readme, f"README.md omits {guide}"

"""Models exported for serving and served by the artifact's own runtime
(`tf.saved_model.load`, onnxruntime) in a fresh process without Keras."""

import json

import numpy as np
import pytest
from processes import BACKENDS, SCRIPTS, needs, run_under

ARTIFACTS = [
    pytest.param(backend, fmt, marks=needs(backend))
    for backend, fmt in [
        ("tensorflow", "tf_saved_model"),
        ("tensorflow", "onnx"),
        ("jax", "tf_saved_model"),
        ("jax", "onnx"),
        ("torch", "onnx"),
    ]
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for backend in BACKENDS:
        run_under(backend, SCRIPTS / "export.py", "export", root)
    # Served under the TensorFlow backend's environment whichever backends
    # exported: the script imports only tensorflow and onnxruntime.
    run_under("tensorflow", SCRIPTS / "export.py", "serve", root, *BACKENDS)
    return root, json.loads((root / "served.json").read_text())


@pytest.mark.parametrize("mode", ["raise", "zeros"])
@pytest.mark.parametrize(("backend", "fmt"), ARTIFACTS)
def test_artifact_gives_the_keras_model_outputs(exported, backend, fmt, mode):
    root, served = exported
    outputs = served[f"{backend}/{mode}/{fmt}"]["ids"]
    assert not isinstance(outputs, dict), outputs  # no runtime error
    np.testing.assert_allclose(
        np.asarray(outputs), np.load(root / backend / f"{mode}_keras.npy"), atol=1e-6
    )


@pytest.mark.parametrize(
    "head",
    [
        "lm_float",
        "lm_float_untied",
        "lm_int8_untied",
        "lm_int4_lora",
        "lm_int4_partials",
        "lm_int4_per_row_untied",
    ],
)
@pytest.mark.parametrize(("backend", "fmt"), ARTIFACTS)
def test_language_model_head_artifact_gives_the_keras_logits(
    exported, backend, fmt, head
):
    """A ReversibleEmbedding's reverse projection (float with a soft cap,
    int8's chunked integer product, int4 with LoRA, int4 by per-group
    partial logits) exports and serves."""
    root, served = exported
    logits = served[f"{backend}/{head}/{fmt}"]
    assert not isinstance(logits, dict), logits  # no runtime error
    np.testing.assert_allclose(
        np.asarray(logits),
        np.load(root / backend / f"{head}_keras.npy"),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("bag", ["bag_mean", "bag_max_int8"])
@pytest.mark.parametrize(("backend", "fmt"), ARTIFACTS)
def test_bag_artifact_gives_the_keras_outputs(exported, backend, fmt, bag):
    """An EmbeddingBag model (padding left out; an int8 table with max)
    exports and serves, invalid ids dropped from their bags as in Keras."""
    root, served = exported
    for ids in ("ids", "bad"):
        outputs = served[f"{backend}/{bag}/{fmt}"][ids]
        assert not isinstance(outputs, dict), (ids, outputs)
        suffix = "" if ids == "ids" else "_bad"
        np.testing.assert_allclose(
            np.asarray(outputs),
            np.load(root / backend / f"{bag}_keras{suffix}.npy"),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize(("backend", "fmt"), ARTIFACTS)
def test_invalid_ids_in_an_artifact_give_zero_rows(exported, backend, fmt):
    """A graph cannot raise: invalid ids get zero rows, as in a traced call,
    for `invalid_ids="zeros"` always, and for `"raise"` wherever the export
    traces the model symbolically (TensorFlow, JAX)."""
    root, served = exported
    modes = ["zeros"] if backend == "torch" else ["raise", "zeros"]
    for mode in modes:
        outputs = served[f"{backend}/{mode}/{fmt}"]["bad"]
        assert not isinstance(outputs, dict), (mode, outputs)
        np.testing.assert_allclose(
            np.asarray(outputs),
            np.load(root / backend / f"{mode}_keras_bad.npy"),
            atol=1e-6,
        )


@needs("torch")
def test_torch_onnx_with_raise_has_no_id_handling(exported):
    """Keras exports a PyTorch model by tracing it with real sample ids: the
    eager check passes on them and leaves nothing in the graph. The artifact
    then fails on an id past the vocabulary (onnxruntime's Gather) and would
    wrap a negative one; docs/serving.md says to export with
    invalid_ids="zeros"."""
    _, served = exported
    bad = served["torch/raise/onnx"]["bad"]
    assert isinstance(bad, dict), bad
    assert "indices element out of data bounds" in bad["message"]

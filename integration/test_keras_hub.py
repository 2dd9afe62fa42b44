"""keras-hub's models upgraded by `replace_embeddings`, on every backend.

scripts/keras_hub_models.py runs in one process per backend, all at once:
tiny GPT-2, Gemma (with a final logit soft cap), Llama (untied reverse
embeddings) and BERT (masked LM, whose head shares the backbone's token
embedding) tasks, built from constructor arguments and called on token ids.
Each is upgraded in place and checked: its layers and graph, its logits, that
it really runs our layer, greedy `generate`, LoRA through keras-hub's own
`enable_lora` / `save_lora_weights` / `load_lora_weights`, `Model.quantize`,
and a stock `.keras` file reloaded under every backend and upgraded there.
The tests compare the files those processes wrote; a step that raised in the
script fails its test here with the script's traceback.

keras-hub is a test dependency installed without its dependencies
(requirements-keras-hub.txt explains why); the module is skipped without it.
"""

import importlib.util
import itertools
import json

import numpy as np
import pytest
from processes import (
    BACKENDS,
    SCRIPTS,
    needs_keras_hub_on_this_keras,
    run_under_each,
)

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("keras_hub") is None,
        reason="keras-hub is not installed (make setup installs "
        "requirements-keras-hub.txt)",
    ),
    needs_keras_hub_on_this_keras,
]

MODELS = ("gpt2", "gemma", "llama", "bert")
CAUSAL = ("gpt2", "gemma", "llama")
PAIRS = list(itertools.product(BACKENDS, BACKENDS))
KERAS_REVERSIBLE = "keras.src.layers.core.reversible_embedding.ReversibleEmbedding"
KERAS_EMBEDDING = "keras.src.layers.core.embedding.Embedding"
HUB_REVERSIBLE = (
    "keras_hub.src.layers.modeling.reversible_embedding.ReversibleEmbedding"
)
OUR_REVERSIBLE = "keras_ext_embedding.reversible_embedding.ReversibleEmbedding"
OUR_EMBEDDING = "keras_ext_embedding.embedding.Embedding"
# Every embedding layer of each model, by path, before and after the upgrade.
STOCK_LAYERS = {name: {"token_embedding": KERAS_REVERSIBLE} for name in MODELS}
STOCK_LAYERS["bert"] = {**STOCK_LAYERS["bert"], "segment_embedding": KERAS_EMBEDDING}
UPGRADED_LAYERS = {name: {"token_embedding": OUR_REVERSIBLE} for name in MODELS}
UPGRADED_LAYERS["bert"] = {
    **UPGRADED_LAYERS["bert"],
    "segment_embedding": OUR_EMBEDDING,
}
# Graph nodes running an embedding layer, backbone and task together: the
# causal tasks call the backbone's token embedding again with reverse=True
# (BERT's head calls it inside its own call, not as a node).
UPGRADED_GRAPH = {name: [OUR_REVERSIBLE] * 2 for name in CAUSAL}
UPGRADED_GRAPH["bert"] = [OUR_EMBEDDING, OUR_REVERSIBLE]
ADAPTERS = ["token_embedding/lora_embeddings_a", "token_embedding/lora_embeddings_b"]
# Float logits: the same ops on the same weights.
FLOAT = {"rtol": 1e-5, "atol": 1e-5}
# A quantized model against the same quantization of the stock model,
# relative to the largest logit.
QUANTIZED_RTOL = {"int8": 1e-5, "int4": 1e-5}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras_hub")
    run_under_each(SCRIPTS / "keras_hub_models.py", "run", root, *BACKENDS)
    return root


def step(directory, name):
    """What step `name` recorded; fails with the script's error if it raised."""
    path = directory / f"{name}.json"
    if not path.exists():
        pytest.fail(
            f"step {name!r} ({directory}) did not run: an earlier step of the "
            "model failed (see its test)",
            pytrace=False,
        )
    facts = json.loads(path.read_text())
    if "error" in facts:
        pytest.fail(
            f"step {name!r} ({directory}) raised {facts['error']}\n"
            f"{facts['traceback']}",
            pytrace=False,
        )
    return facts


def array(directory, name):
    return np.load(directory / f"{name}.npy")


def max_diff(a, b):
    return float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_hub_builds_keras_layers(results, backend, name):
    """What replace_embeddings starts from: keras-hub's models hold Keras's
    own classes (none uses keras_hub.layers.ReversibleEmbedding), built
    without tensorflow_text."""
    facts = step(results / backend / name, "stock")
    assert facts["token_embedding"] == KERAS_REVERSIBLE
    assert not facts["tensorflow_text_imported"]
    assert step(results / backend / name, "replace")["before"] == STOCK_LAYERS[name]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_embedding_becomes_ours(results, backend, name):
    facts = step(results / backend / name, "replace")
    assert facts["returned_same_model"]
    assert facts["after"] == UPGRADED_LAYERS[name]
    assert facts["token_embedding"] == OUR_REVERSIBLE
    # The graph's nodes run the new layer, the task's reverse node included,
    # and get_layer finds the layer the attribute holds.
    assert sorted(facts["graph"]) == sorted(UPGRADED_GRAPH[name])
    assert facts["nodes_run_token_embedding"]
    assert facts["get_layer_is_attribute"]
    # No Keras embedding layer is left; our layers' variables are the model's.
    assert facts["keras_layers_left"] == []
    assert facts["our_variables_in_model"]
    # The layer keeps its configuration.
    assert facts["logit_soft_cap"] == (30.0 if name == "gemma" else None)
    assert facts["tie_weights"] == (name != "llama")
    if name == "bert":
        assert facts["segment_embedding"] == OUR_EMBEDDING
        assert facts["get_segment_layer_is_attribute"]
        assert facts["head_shares_token_embedding"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_are_unchanged(results, backend, name):
    directory = results / backend / name
    step(directory, "replace")
    np.testing.assert_allclose(
        array(directory, "replaced_logits"), array(directory, "stock_logits"), **FLOAT
    )
    # `predict` too, traced before the upgrade and again after it.
    np.testing.assert_allclose(
        array(directory, "replaced_predicted"),
        array(directory, "stock_predicted"),
        **FLOAT,
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_runs_our_layer(results, backend, name):
    """Only ours raises InvalidIdError, and our table drives the logits."""
    facts = step(results / backend / name, "runs_our_layer")
    assert facts["invalid_token"]["is_invalid_id_error"], facts["invalid_token"]
    assert "token_embedding" in facts["invalid_token"]["message"]
    assert facts["row_change_logit_diff"] > 1e-3
    # `predict`'s function, traced before the upgrade, was dropped.
    assert facts["row_change_predict_diff"] > 1e-3
    if name == "bert":
        assert facts["invalid_segment"]["is_invalid_id_error"], facts["invalid_segment"]
        assert facts["segment_change_logit_diff"] > 1e-3


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_is_unchanged(results, backend, name):
    directory = results / backend / name
    step(directory, "generate_stock")
    facts = step(directory, "generate_replaced")
    assert facts["token_embedding"] == OUR_REVERSIBLE
    np.testing.assert_array_equal(
        array(directory, "generated_replaced"), array(directory, "generated_stock")
    )


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_runs_our_layer(results, backend, name):
    """With our tables zeroed every logit is 0 and greedy picks id 0 after
    the prompt. A generate function compiled before the upgrade (keras-hub
    caches it in `generate_function`) would still run the stock layer."""
    directory = results / backend / name
    facts = step(directory, "generate_replaced")
    assert facts["token_embedding"] == OUR_REVERSIBLE
    generated = array(directory, "generated_zero_table")
    prompt = array(directory, "generated_stock")
    prompt_mask = np.zeros(prompt.shape, bool)
    prompt_mask[0, :4] = prompt_mask[1, :3] = True
    np.testing.assert_array_equal(generated[prompt_mask], prompt[prompt_mask])
    assert (generated[~prompt_mask] == 0).all(), (
        f"generate after replace_embeddings ignores our zeroed table: "
        f"{generated.tolist()} (the stock model generated {prompt.tolist()})"
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_trains_the_adapters_only(results, backend, name):
    facts = step(results / backend / name, "lora_fit")
    assert facts["token_embedding"] == OUR_REVERSIBLE
    assert facts["lora_enabled"]
    assert facts["trainable"] == ADAPTERS
    losses = facts["losses"]
    assert losses[-1] < losses[0], losses
    moved = facts["moved"]
    assert moved["embeddings"] == 0.0
    if name == "llama":
        # Untied: reverse_embeddings is frozen while LoRA is on.
        assert moved["reverse_embeddings"] == 0.0
    assert moved["lora_embeddings_a"] > 0.0
    assert moved["lora_embeddings_b"] > 0.0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_weights_reload(results, backend, name):
    """keras-hub's save_lora_weights, then load_lora_weights into a fresh
    upgraded model with LoRA on: the same logits, which LoRA has changed."""
    directory = results / backend / name
    step(directory, "lora_fit")
    facts = step(directory, "lora_reload")
    assert facts["token_embedding"] == OUR_REVERSIBLE
    trained = array(directory, "lora_logits")
    np.testing.assert_allclose(
        array(directory, "lora_reloaded_logits"), trained, **FLOAT
    )
    assert max_diff(trained, array(directory, "stock_logits")) > 1e-3


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_quantize(results, backend, name, mode):
    """Model.quantize on the upgraded model quantizes our token embedding;
    the logits are those of the same quantization of the stock model."""
    directory = results / backend / name
    stock = step(directory, f"{mode}_stock")
    assert stock["quantization_mode"] == mode
    facts = step(directory, f"{mode}_replaced")
    assert facts["token_embedding"] == OUR_REVERSIBLE
    assert facts["quantization_mode"] == mode
    assert sorted(facts["graph"]) == sorted(UPGRADED_GRAPH[name])
    assert facts["variables"]["embeddings"][0] == "int8"  # int4 is packed in int8
    expected = array(directory, f"{mode}_stock_logits")
    logits = array(directory, f"{mode}_replaced_logits")
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(
        logits, expected, rtol=0, atol=QUANTIZED_RTOL[mode] * scale
    )
    # Quantized for real: not the float logits.
    assert max_diff(logits, array(directory, "stock_logits")) > 1e-4


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("name", MODELS)
def test_stock_keras_file_reloads_and_upgrades(results, name, saver, loader):
    """A stock .keras file reloads with Keras's own classes (keras-hub builds
    them); upgraded, it gives the saver's logits."""
    directory = results / saver / f"loaded_by_{loader}" / name
    facts = step(directory, "reload")
    assert facts["before"] == STOCK_LAYERS[name]
    assert facts["after"] == UPGRADED_LAYERS[name]
    assert sorted(facts["graph"]) == sorted(UPGRADED_GRAPH[name])
    np.testing.assert_allclose(
        array(directory, "logits"),
        array(results / saver / name, "stock_logits"),
        **FLOAT,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_hub_reversible_embedding_class(results, backend):
    """keras_hub.layers.ReversibleEmbedding, keras-hub's empty subclass, in a
    Functional model (upgraded in place): ours, the same logits, it checks
    ids, and a `.keras` file of the model reloads with ours."""
    directory = results / backend / "hub_layer"
    facts = step(directory, "replace")
    assert facts["returned_same_model"]
    assert facts["before"] == {"token_embedding": HUB_REVERSIBLE}
    assert facts["after"] == {"token_embedding": OUR_REVERSIBLE}
    assert facts["get_layer"] == OUR_REVERSIBLE
    assert facts["graph"] == [OUR_REVERSIBLE] * 2
    assert facts["invalid_token"]["is_invalid_id_error"], facts["invalid_token"]
    np.testing.assert_allclose(
        array(directory, "replaced_logits"), array(directory, "stock_logits"), **FLOAT
    )
    assert facts["reloaded"] == {"token_embedding": OUR_REVERSIBLE}
    np.testing.assert_array_equal(
        array(directory, "reloaded_logits"), array(directory, "replaced_logits")
    )

"""keras-hub models upgraded by `replace_embeddings`, under one backend.

    python keras_hub_models.py run DIR BACKEND...   # writes DIR/<backend>/

The models are tiny keras-hub tasks built from constructor arguments (no
preset, no tokenizer, no preprocessor: nothing downloads and tensorflow_text
is never imported), called on token ids. Every check is a step that writes
what it saw to DIR/<backend>/<model>/<step>.json (and its arrays to .npy); a
step that raises records the error instead, so the other steps still run and
the test process reports each failure on its own. The test process compares
the files without importing keras.

One process per backend does everything, in three phases, so that the
import of keras-hub (several seconds) is paid once per backend:

1. builds each stock model, writes its logits and its `.keras` file, then
   DIR/<backend>/saved;
2. runs the checks on each model;
3. for each BACKEND (this one included), waits for DIR/<backend>/saved, then
   reloads that backend's `.keras` files, upgrades them and writes their
   logits to DIR/<saver>/loaded_by_<this backend>/. The processes of the
   other backends run at the same time (integration/processes.py's
   run_under_each) and write their files in their phase 1.
"""

import contextlib
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The three backends' processes share the machine's cores: PyTorch's OpenMP
# threads, spinning while the other processes hold the cores, made its
# process ~4x slower on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras
import keras_hub
import numpy as np
from keras import ops

import keras_ext_embedding
from keras_ext_embedding import InvalidIdError, replace_embeddings

BACKEND = keras.config.backend()
SEED = 1234
VOCAB, HIDDEN, INTERMEDIATE = 512, 32, 64
LORA_RANK = 4
FIT_STEPS = 6
# Phase 3 waits this long for another backend's phase 1.
SAVED_TIMEOUT_S = 240

_rng = np.random.default_rng(SEED)
TOKEN_IDS = _rng.integers(1, VOCAB, size=(2, 8)).astype("int32")
PADDING_MASK = np.ones((2, 8), "int32")
PADDING_MASK[1, 6:] = 0
SEGMENT_IDS = _rng.integers(0, 2, size=(2, 8)).astype("int32")
MASK_POSITIONS = np.array([[1, 4, 6], [0, 2, 5]], "int32")
# A prompt of 4 and of 3 tokens; generate fills the positions the mask leaves.
PROMPT_MASK = np.zeros((2, 10), "int32")
PROMPT_MASK[0, :4] = PROMPT_MASK[1, :3] = 1
PROMPT_IDS = _rng.integers(1, VOCAB, size=(2, 10)).astype("int32") * PROMPT_MASK
# LoRA fine-tuning data: 8 random sequences, one batch.
FIT_TOKENS = _rng.integers(1, VOCAB, size=(8, 9)).astype("int32")
FIT_MASK_POSITIONS = np.stack(
    [_rng.choice(8, size=2, replace=False) for _ in range(8)]
).astype("int32")


def _gpt2():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=32,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _gemma():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        head_dim=16,
        final_logit_soft_cap=30.0,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _llama():
    # Untied: the reverse pass reads `reverse_embeddings` (hidden, vocab).
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        tie_word_embeddings=False,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _bert():
    # Its MaskedLMHead holds backbone.token_embedding (tied reverse); the
    # backbone's segment_embedding is a plain keras.layers.Embedding.
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=32,
    )
    return keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)


MODELS = {"gpt2": _gpt2, "gemma": _gemma, "llama": _llama, "bert": _bert}
CAUSAL = ("gpt2", "gemma", "llama")


def build(name, weights=None):
    """The stock model `name`, from a fixed seed, or holding `weights`."""
    keras.utils.set_random_seed(SEED + sorted(MODELS).index(name))
    model = MODELS[name]()
    if weights is not None:
        model.set_weights(weights)
    return model


def inputs_of(name, token_ids=TOKEN_IDS, segment_ids=SEGMENT_IDS):
    inputs = {"token_ids": token_ids, "padding_mask": PADDING_MASK}
    if name == "bert":
        inputs.update(segment_ids=segment_ids, mask_positions=MASK_POSITIONS)
    return inputs


def logits_of(model, name, **inputs):
    """The eager call's logits: (2, 8, VOCAB), or (2, 3, VOCAB) for BERT."""
    return ops.convert_to_numpy(model(inputs_of(name, **inputs)))


def predict_of(model, name):
    """`model.predict`'s logits: a traced call."""
    return np.asarray(model.predict(inputs_of(name), batch_size=2, verbose=0))


def fit_data(name):
    if name == "bert":
        tokens = FIT_TOKENS[:, :8]
        x = {
            "token_ids": tokens,
            "segment_ids": np.zeros_like(tokens),
            "padding_mask": np.ones_like(tokens),
            "mask_positions": FIT_MASK_POSITIONS,
        }
        return x, np.take_along_axis(tokens, FIT_MASK_POSITIONS, axis=1)
    x = {
        "token_ids": FIT_TOKENS[:, :-1],
        "padding_mask": np.ones_like(FIT_TOKENS[:, :-1]),
    }
    return x, FIT_TOKENS[:, 1:]


def class_of(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# Keras's Embedding (and ReversibleEmbedding, its subclass) and ours.
EMBEDDINGS = (keras.layers.Embedding, keras_ext_embedding.Embedding)


def embedding_layers(model):
    """{path: class} of every embedding layer, Keras's or ours."""
    return {
        layer.path: class_of(layer)
        for layer in model._flatten_layers()
        if isinstance(layer, EMBEDDINGS)
    }


def graph_embeddings(model):
    """Classes of the embedding layers the nodes of `model`'s graph run."""
    return sorted(
        class_of(node.operation)
        for nodes in model._nodes_by_depth.values()
        for node in nodes
        if isinstance(node.operation, EMBEDDINGS)
    )


def table(layer, name="embeddings"):
    """The layer's variable called `name` (Keras's names, ours are the same)."""
    (variable,) = [v for v in layer.weights if v.name == name]
    return variable


def numpy_weights(layer):
    return {v.name: ops.convert_to_numpy(v) for v in layer.weights}


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def raised_by(call):
    """What `call()` raises: its class and, for ours, the message."""
    try:
        call()
    except Exception as error:
        return {
            "class": class_of(error),
            "is_invalid_id_error": isinstance(error, InvalidIdError),
            "message": str(error)[:500],
        }
    return {"class": None, "is_invalid_id_error": False, "message": ""}


class Results:
    """DIR/<backend>/<model>/: one JSON per step, arrays as .npy."""

    def __init__(self, directory):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, name, array):
        np.save(self.directory / f"{name}.npy", np.asarray(array))

    @contextlib.contextmanager
    def step(self, name):
        facts = {}
        # Keras runs gc.collect() each time quantize deletes a variable: with
        # TensorFlow, JAX and keras-hub loaded that costs ~0.4 s a call, 20 s
        # a model. Frozen objects are not scanned again.
        gc.freeze()
        start = time.perf_counter()
        try:
            yield facts
        except Exception as error:
            facts["error"] = f"{class_of(error)}: {error}"[:3000]
            facts["traceback"] = traceback.format_exc()[-4000:]
        facts["seconds"] = round(time.perf_counter() - start, 2)
        (self.directory / f"{name}.json").write_text(json.dumps(facts, indent=1))


def check_replacement(name, model, results):
    """replace_embeddings in place: layers, graph nodes, shared references,
    logits, and that the model really runs our layer."""
    backbone = model.backbone
    with results.step("replace") as facts:
        facts["before"] = embedding_layers(model)
        # A predict function traced before the upgrade, which it drops.
        results.save("stock_predicted", predict_of(model, name))
        returned = replace_embeddings(model)
        facts["returned_same_model"] = returned is model
        facts["after"] = embedding_layers(model)
        facts["token_embedding"] = class_of(backbone.token_embedding)
        facts["graph"] = graph_embeddings(model) + graph_embeddings(backbone)
        layer = backbone.token_embedding
        facts["token_embedding_nodes"] = len(layer._inbound_nodes)
        facts["nodes_run_token_embedding"] = all(
            node.operation is layer for node in layer._inbound_nodes
        )
        facts["get_layer_is_attribute"] = backbone.get_layer("token_embedding") is layer
        if name == "bert":
            facts["segment_embedding"] = class_of(backbone.segment_embedding)
            facts["head_shares_token_embedding"] = (
                model.masked_lm_head.token_embedding is layer
            )
            facts["get_segment_layer_is_attribute"] = (
                backbone.get_layer("segment_embedding") is backbone.segment_embedding
            )
        facts["logit_soft_cap"] = getattr(layer, "logit_soft_cap", None)
        facts["tie_weights"] = getattr(layer, "tie_weights", None)
        # No Keras embedding layer nor variable is left in the model.
        keras_layers = [
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, keras.layers.Embedding)
        ]
        facts["keras_layers_left"] = [layer.path for layer in keras_layers]
        ours = [
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, keras_ext_embedding.Embedding)
        ]
        model_variables = {id(v) for v in model.weights}
        facts["our_variables_in_model"] = all(
            id(v) in model_variables for layer in ours for v in layer.weights
        )
        results.save("replaced_logits", logits_of(model, name))
        results.save("replaced_predicted", predict_of(model, name))

    with results.step("runs_our_layer") as facts:
        layer = backbone.token_embedding
        bad = TOKEN_IDS.copy()
        bad[0, 2] = VOCAB
        facts["invalid_token"] = raised_by(lambda: model(inputs_of(name, bad)))
        # One row of our table moved: the logits move with it.
        variable = table(layer)
        original = ops.convert_to_numpy(variable)
        # A random row: a constant shift would vanish in the layer norms.
        moved = original.copy()
        moved[TOKEN_IDS[0, 0]] = np.random.default_rng(0).normal(size=HIDDEN)
        variable.assign(moved)
        facts["row_change_logit_diff"] = max_diff(
            logits_of(model, name), np.load(results.directory / "replaced_logits.npy")
        )
        facts["row_change_predict_diff"] = max_diff(
            predict_of(model, name),
            np.load(results.directory / "replaced_predicted.npy"),
        )
        variable.assign(original)
        if name == "bert":
            segments = backbone.segment_embedding
            bad = SEGMENT_IDS.copy()
            bad[1, 3] = 2
            facts["invalid_segment"] = raised_by(
                lambda: model(inputs_of(name, segment_ids=bad))
            )
            variable = table(segments)
            original = ops.convert_to_numpy(variable)
            variable.assign(np.random.default_rng(1).normal(size=original.shape))
            facts["segment_change_logit_diff"] = max_diff(
                logits_of(model, name),
                np.load(results.directory / "replaced_logits.npy"),
            )
            variable.assign(original)


def generate(model):
    outputs = model.generate(
        {"token_ids": PROMPT_IDS, "padding_mask": PROMPT_MASK}, stop_token_ids=None
    )
    return np.asarray(outputs["token_ids"])


def check_generate_after(model, results):
    """Greedy generate after the replacement, then with our tables zeroed:
    all logits 0, so greedy picks id 0 at every generated position (a
    generate function still holding the stock layer would not)."""
    with results.step("generate_replaced") as facts:
        results.save("generated_replaced", generate(model))
        layer = model.backbone.token_embedding
        facts["token_embedding"] = class_of(layer)
        names = [
            n
            for n in ("embeddings", "reverse_embeddings")
            if n in [v.name for v in layer.weights]
        ]
        originals = {n: ops.convert_to_numpy(table(layer, n)) for n in names}
        for n, value in originals.items():
            table(layer, n).assign(np.zeros_like(value))
        results.save("generated_zero_table", generate(model))
        for n, value in originals.items():
            table(layer, n).assign(value)
        facts["zeroed"] = names


def enable_lora(model):
    model.backbone.enable_lora(LORA_RANK, target_layer_names=["token_embedding"])
    if hasattr(model, "masked_lm_head"):
        # backbone.enable_lora freezes the backbone only: the MaskedLM head's
        # dense, layer norm and output bias would train too, and
        # save_lora_weights does not save them.
        head = model.masked_lm_head
        head._intermediate_dense.trainable = False
        head._intermediate_layer_norm.trainable = False
        head._bias.trainable = False


def check_lora(name, weights, results):
    """LoRA on the upgraded token embedding: fit, then keras-hub's own
    save_lora_weights / load_lora_weights into a fresh upgraded model."""
    model = None
    lora_path = results.directory / "adapters.lora.h5"
    with results.step("lora_fit") as facts:
        model = build(name, weights)
        replace_embeddings(model)
        layer = model.backbone.token_embedding
        facts["token_embedding"] = class_of(layer)
        enable_lora(model)
        facts["lora_enabled"] = bool(getattr(layer, "lora_enabled", False))
        facts["trainable"] = sorted(v.path for v in model.trainable_weights)
        before = numpy_weights(layer)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        x, y = fit_data(name)
        history = model.fit(
            x, y, batch_size=len(y), epochs=FIT_STEPS, shuffle=False, verbose=0
        )
        facts["losses"] = [float(loss) for loss in history.history["loss"]]
        after = numpy_weights(layer)
        facts["moved"] = {k: max_diff(before[k], after[k]) for k in before}
        results.save("lora_logits", logits_of(model, name))
    with results.step("lora_reload") as facts:
        model.backbone.save_lora_weights(lora_path)
        fresh = build(name, weights)
        replace_embeddings(fresh)
        enable_lora(fresh)
        fresh.backbone.load_lora_weights(lora_path)
        facts["token_embedding"] = class_of(fresh.backbone.token_embedding)
        results.save("lora_reloaded_logits", logits_of(fresh, name))


def check_quantize(name, weights, mode, results):
    """model.quantize(mode) on a stock model and on an upgraded one."""
    with results.step(f"{mode}_stock") as facts:
        stock = build(name, weights)
        stock.quantize(mode)
        layer = stock.backbone.token_embedding
        facts["quantization_mode"] = layer.dtype_policy.quantization_mode
        results.save(f"{mode}_stock_logits", logits_of(stock, name))
    with results.step(f"{mode}_replaced") as facts:
        ours = build(name, weights)
        replace_embeddings(ours)
        ours.quantize(mode)
        layer = ours.backbone.token_embedding
        facts["token_embedding"] = class_of(layer)
        facts["quantization_mode"] = layer.dtype_policy.quantization_mode
        facts["dtype_policy"] = layer.dtype_policy.name
        facts["variables"] = {
            v.name: [keras.backend.standardize_dtype(v.dtype), list(v.shape)]
            for v in layer.weights
        }
        facts["graph"] = graph_embeddings(ours) + graph_embeddings(ours.backbone)
        results.save(f"{mode}_replaced_logits", logits_of(ours, name))


def check_hub_layer(results):
    """keras_hub.layers.ReversibleEmbedding (keras-hub's own subclass, which
    none of its models use) in a Functional model, upgraded in place, then
    saved to `.keras` and reloaded."""
    with results.step("replace") as facts:
        keras.utils.set_random_seed(SEED)
        inputs = keras.Input((None,), dtype="int32")
        embedding = keras_hub.layers.ReversibleEmbedding(
            VOCAB, HIDDEN, name="token_embedding"
        )
        hidden = keras.layers.Dense(HIDDEN, name="dense")(embedding(inputs))
        model = keras.Model(inputs, embedding(hidden, reverse=True))
        results.save("stock_logits", ops.convert_to_numpy(model(TOKEN_IDS)))
        facts["before"] = embedding_layers(model)
        facts["returned_same_model"] = replace_embeddings(model) is model
        facts["after"] = embedding_layers(model)
        facts["graph"] = graph_embeddings(model)
        facts["get_layer"] = class_of(model.get_layer("token_embedding"))
        results.save("replaced_logits", ops.convert_to_numpy(model(TOKEN_IDS)))
        bad = TOKEN_IDS.copy()
        bad[1, 1] = -1
        facts["invalid_token"] = raised_by(lambda: model(bad))
        path = results.directory / "upgraded.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path)
        facts["reloaded"] = embedding_layers(reloaded)
        results.save("reloaded_logits", ops.convert_to_numpy(reloaded(TOKEN_IDS)))


def save_stock(name, directory):
    """Phase 1: the stock model, its logits and its `.keras` file."""
    results = Results(directory / name)
    model = weights = None
    with results.step("stock") as facts:
        model = build(name)
        weights = model.get_weights()
        facts["token_embedding"] = class_of(model.backbone.token_embedding)
        # keras-hub is installed without tensorflow-text, which it imports
        # only in its tokenizers.
        facts["tensorflow_text_imported"] = "tensorflow_text" in sys.modules
        results.save("stock_logits", logits_of(model, name))
        # keras-hub tasks compile themselves at construction.
        model.save(directory / f"{name}.keras")
    return model, weights, results


def check(name, model, weights, results):
    """Phase 2: every check on one model."""
    if name in CAUSAL:
        with results.step("generate_stock"):
            model.compile(sampler="greedy")
            results.save("generated_stock", generate(model))
    check_replacement(name, model, results)
    if name in CAUSAL:
        check_generate_after(model, results)
    check_lora(name, weights, results)
    for mode in ("int8", "int4"):
        check_quantize(name, weights, mode, results)


def wait_for(marker, timeout=SAVED_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{marker} did not appear within {timeout} s: that backend's "
                "process failed or is still in its phase 1 (see its output)."
            )
        time.sleep(0.5)


def load(root, saver):
    """Phase 3: the `.keras` files `saver` wrote, reloaded and upgraded."""
    try:
        wait_for(root / saver / "saved")
        missing = None
    except TimeoutError as error:
        missing = error
    for name in MODELS:
        results = Results(root / saver / f"loaded_by_{BACKEND}" / name)
        with results.step("reload") as facts:
            if missing is not None:
                raise missing
            model = keras.saving.load_model(root / saver / f"{name}.keras")
            facts["model"] = class_of(model)
            facts["before"] = embedding_layers(model)
            replace_embeddings(model)
            facts["after"] = embedding_layers(model)
            facts["graph"] = graph_embeddings(model) + graph_embeddings(model.backbone)
            results.save("logits", logits_of(model, name))


def run(root, *backends):
    out = root / BACKEND
    out.mkdir(parents=True, exist_ok=True)
    try:
        stock = {name: save_stock(name, out) for name in MODELS}
    finally:
        # Even after a failure: the other backends record what is missing
        # instead of waiting.
        (out / "saved").touch()
    for name, (model, weights, results) in stock.items():
        if model is not None:
            check(name, model, weights, results)
    check_hub_layer(Results(out / "hub_layer"))
    for saver in backends:
        load(root, saver)


if __name__ == "__main__":
    # keras-hub's quantize warns for every layer it has nothing to quantize
    # in; NumPy 2 warns about __array__(copy=...) of Keras's JAX variables.
    warnings.simplefilter("ignore")
    command, root, backends = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"run": run}[command](root, *backends)
    print(f"{command} under {BACKEND}: ok")

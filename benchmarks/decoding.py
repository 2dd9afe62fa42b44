"""Greedy decoding with a small keras-hub causal LM: stock against
`keras_ext_embedding.replace_embeddings`.

A 2-layer `GemmaCausalLM` built from its constructor arguments (no preset,
no tokenizer, no preprocessor: nothing is downloaded), with a vocabulary of
`plan["decoding_vocab"]` entries and `hidden_dim=256`: its tied token
embedding, a `ReversibleEmbedding`, is the largest layer, and every decoding
step looks up one token and projects one hidden state onto the whole
vocabulary. Two models hold the same weights; one gets our layers. Then both
are changed alike: LoRA on the token embedding (`backbone.enable_lora(8,
target_layer_names=["token_embedding"])`, a non-zero `B`), or
`model.quantize("int8" / "int4")`, which quantizes the dense layers too.
Each is compiled with the greedy sampler; `generate` runs as keras-hub
compiles it (`jax.jit` on JAX, `tf.function` on TensorFlow, eagerly on
PyTorch).
"""

import gc

import keras
import numpy as np
from plan import DECODING_FORMATS, LORA_RANK
from timing import SEED, block, compare, release_memory

import keras_ext_embedding

HIDDEN_DIM = 256


def gemma(vocab):
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocab,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN_DIM,
        intermediate_dim=512,
        head_dim=128,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def prompts(plan):
    """`{"token_ids", "padding_mask"}`, backend tensors: prompts of
    `decoding_prompt` random ids, padded to `decoding_length` (without a
    preprocessor, `generate` fills the padded positions)."""
    rng = np.random.default_rng(SEED)
    shape = (plan["decoding_batch"], plan["decoding_length"])
    mask = np.zeros(shape, "int32")
    mask[:, : plan["decoding_prompt"]] = 1
    ids = rng.integers(1, plan["decoding_vocab"], size=shape).astype("int32")
    return {
        "token_ids": keras.ops.convert_to_tensor(ids * mask),
        "padding_mask": keras.ops.convert_to_tensor(mask),
    }


def model_pair(plan, name):
    """The stock model and the upgraded one, holding the same weights, in
    format `name`, compiled with the greedy sampler."""
    stock = gemma(plan["decoding_vocab"])
    ours = gemma(plan["decoding_vocab"])
    ours.set_weights(stock.get_weights())
    keras_ext_embedding.replace_embeddings(ours)
    models = (stock, ours)
    if name == "float32_lora":
        for model in models:
            model.backbone.enable_lora(
                LORA_RANK, target_layer_names=["token_embedding"]
            )
        rng = np.random.default_rng(SEED)
        b = rng.normal(size=(LORA_RANK, HIDDEN_DIM)).astype("float32") * 0.01
        stock_layer = stock.backbone.token_embedding
        a = keras.ops.convert_to_numpy(stock_layer.lora_embeddings_a)
        for model in models:
            layer = model.backbone.token_embedding
            layer.lora_embeddings_a.assign(a)
            layer.lora_embeddings_b.assign(b)
    elif name in ("int8", "int4"):
        for model in models:
            model.quantize(name)
    for model in models:
        model.compile(sampler="greedy")
    layer = ours.backbone.token_embedding
    if not isinstance(layer, keras_ext_embedding.ReversibleEmbedding):
        raise AssertionError(f"replace_embeddings left {type(layer).__name__}")
    return stock, ours


def generated(model, inputs):
    outputs = block(model.generate(inputs, stop_token_ids=None))
    return np.asarray(keras.ops.convert_to_numpy(outputs["token_ids"]))


def bench(plan, report):
    # Keras runs gc.collect() each time quantize deletes a variable: with
    # the backends and keras-hub loaded that costs ~0.4 s a call. Objects
    # alive now are not scanned again.
    gc.freeze()
    inputs = prompts(plan)
    new_tokens = plan["decoding_length"] - plan["decoding_prompt"]
    for name in DECODING_FORMATS:
        stock, ours = model_pair(plan, name)
        # The first generate traces and compiles; its tokens are compared.
        keras_tokens = generated(stock, inputs)
        ours_tokens = generated(ours, inputs)
        differ = np.argwhere(keras_tokens != ours_tokens)
        result = compare(
            {
                "ours": lambda ours=ours: generated(ours, inputs),
                "keras": lambda stock=stock: generated(stock, inputs),
            },
            plan["decoding_reps"],
            warmup=0,
        )
        result["ratio"] = result["ours"]["median_ms"] / result["keras"]["median_ms"]
        report(
            format=name,
            vocab=plan["decoding_vocab"],
            hidden_dim=HIDDEN_DIM,
            batch=plan["decoding_batch"],
            prompt=plan["decoding_prompt"],
            length=plan["decoding_length"],
            new_tokens=new_tokens,
            **result,
            ours_ms_per_token=result["ours"]["median_ms"] / new_tokens,
            keras_ms_per_token=result["keras"]["median_ms"] / new_tokens,
            same_tokens=differ.size == 0,
            first_difference=differ[0].tolist() if differ.size else None,
        )
        del stock, ours
        release_memory()
    gc.unfreeze()

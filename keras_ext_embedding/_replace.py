"""Upgrading existing models: every Keras embedding layer becomes ours."""

import contextlib

import keras

from keras_ext_embedding.embedding import Embedding
from keras_ext_embedding.reversible_embedding import ReversibleEmbedding

# Keras's classes and ours: subclasses of Keras's that add nothing of their
# own (keras-hub's `keras_hub.layers.ReversibleEmbedding` is one) count as
# Keras's.
REPLACEMENTS = (
    (keras.layers.ReversibleEmbedding, ReversibleEmbedding),
    (keras.layers.Embedding, Embedding),
)
# What a class may define and still add nothing to its Keras base.
EMPTY_CLASS_ATTRIBUTES = {
    "__module__",
    "__qualname__",
    "__doc__",
    "__dict__",
    "__weakref__",
    "__firstlineno__",
    "__static_attributes__",
    "__annotations__",
    # Set by keras-hub's export decorator on `keras_hub.layers` classes.
    "_api_export_path",
    "_api_export_symbol_id",
}


def replace_embeddings(model, **overrides):
    """Returns `model` with every Keras embedding layer replaced by ours.

    `keras.layers.Embedding` becomes `keras_ext_embedding.Embedding` and
    `keras.layers.ReversibleEmbedding` (keras-hub's token embeddings, its
    `keras_hub.layers.ReversibleEmbedding` included) becomes
    `keras_ext_embedding.ReversibleEmbedding`. Each replacement is our
    class's `from_config` of the Keras layer's config (the same name,
    dimensions, `mask_zero`, tied or untied weights, `reverse_dtype`,
    `logit_soft_cap`, dtype policy, LoRA rank and alpha, quantization) with
    the Keras layer's variables assigned, so the model's outputs stay the
    same (lookups bit for bit without LoRA; logits and LoRA rows up to
    float32 rounding, int8 logits bit for bit). Other subclasses of Keras's
    layers are left alone: their call may differ.

    - A Functional or Sequential model is cloned (`keras.models.clone_model`,
      nested Functional and Sequential models included): the original model
      is not changed. Every other layer of the clone is a fresh layer from its
      config with the original's weights.
    - A subclassed model cannot be cloned by Keras: its Embedding layers (also
      inside its sub-layers, lists and dicts) are replaced in place, and the
      same model object is returned. A subclass built with the functional
      API in its `__init__` (keras-hub backbones and tasks such as
      `GPT2CausalLM`) runs the nodes of its graph, not its attributes: the
      nodes where a Keras layer was called run the replacement from then on,
      and every attribute that shared the old layer (a task's
      `backbone.token_embedding`, keras-hub's `MaskedLMHead.token_embedding`)
      holds the new one.

    A `.keras` file of a keras-hub model reloads as keras-hub builds it, with
    Keras's layers: call `replace_embeddings` again after loading.

    Compile the returned model before training it: the optimizer state of the
    original is not carried over.

    Examples:
        >>> inputs = keras.Input((None,), dtype="int32")
        >>> x = keras.layers.Embedding(1000, 16, name="tokens")(inputs)
        >>> model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(x))
        >>> upgraded = keras_ext_embedding.replace_embeddings(model)
        >>> type(upgraded.get_layer("tokens")).__module__
        'keras_ext_embedding.embedding'

    Args:
        model: A built `keras.Model`.
        **overrides: Arguments of `keras_ext_embedding.Embedding` to set on
            every replacement, e.g. `invalid_ids="zeros"`.

    Returns:
        The model with our Embedding layers.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`replace_embeddings` expects a keras.Model. Received: "
            f"model={model!r} (of type {type(model).__name__})."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: its Embedding layers have no "
            "weights to carry over yet. Build the model (call it once, or "
            "`model.build(input_shape)`) before `replace_embeddings`."
        )
    if _is_graph_model(model):
        return _cloned(model, overrides)
    _replace_in_place(model, overrides)
    return model


def _replacement_class(layer):
    """Our class replacing `layer`, or None if it is not one of Keras's."""
    for keras_class, ours in REPLACEMENTS:
        if isinstance(layer, keras_class) and _adds_nothing(type(layer), keras_class):
            return ours
    return None


def _adds_nothing(cls, base):
    """Whether `cls` is `base` or a chain of subclasses defining nothing."""
    for klass in cls.__mro__:
        if klass is base:
            return True
        if set(vars(klass)) - EMPTY_CLASS_ATTRIBUTES:
            return False
    return False


def _is_keras_embedding(layer):
    return _replacement_class(layer) is not None


def _converted(layer, overrides):
    """Our layer from a Keras layer's config, holding its variables."""
    config = {**layer.get_config(), **overrides}
    replacement = _replacement_class(layer).from_config(config)
    # Built under the old layer's parent scope, its variables get the old
    # variables' paths (e.g. "recommender/users/embeddings").
    parent = layer.path.rpartition("/")[0] if layer.path else ""
    with keras.name_scope(parent) if parent else contextlib.nullcontext():
        replacement.build()
    _copy_variables(layer, replacement)
    return replacement


def _copy_variables(source, target):
    # Through NumPy: on JAX, assigning a variable itself would share one
    # buffer between the two layers, which a donating train step deletes.
    # A replacement with `optimizer=` also holds row-sparse slots, which
    # start afresh.
    state = getattr(target, "_row_sparse_variables", list)()
    weights = [w for w in target.weights if not any(w is v for v in state)]
    names = [w.name for w in weights]
    if names != [w.name for w in source.weights]:
        raise ValueError(
            f"Cannot carry the variables of layer '{source.name}' over to "
            f"its replacement: they are {[w.name for w in source.weights]}, "
            f"the replacement's {names}."
        )
    for new, old in zip(weights, source.weights, strict=True):
        new.assign(keras.ops.convert_to_numpy(old))


def _is_graph_model(model):
    """Functional and Sequential models, which `clone_model` can rebuild."""
    if isinstance(model, keras.Sequential):
        return True
    return type(model).__name__ == "Functional"


def _cloned(model, overrides):
    originals = {}

    def clone(layer):
        if _is_keras_embedding(layer):
            replacement = _converted(layer, overrides)
        else:
            replacement = layer.__class__.from_config(layer.get_config())
        originals[id(replacement)] = layer
        return replacement

    cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for layer in cloned._flatten_layers(include_self=False):
        original = originals.get(id(layer))
        if original is None or _is_keras_embedding(original):
            continue
        if isinstance(original, keras.Model) and _is_graph_model(original):
            continue  # its layers are copied one by one
        _copy_variables(original, layer)
    return cloned


def _replace_in_place(model, overrides):
    replacements = {}

    def replacement_for(owner, old):
        if id(old) not in replacements:
            replacements[id(old)] = (old, _converted(old, overrides))
        new = replacements[id(old)][1]
        # The owner's tracker lists its sub-layers (and so its weights) in
        # order: the replacement takes the old layer's place.
        if owner._tracker.is_in_store("layers", old):
            owner._tracker.replace_tracked_value("layers", old, new)
        return new

    for owner in list(model._flatten_layers(include_self=True)):
        # The tracker's own lists are updated by replace_tracked_value.
        stores = [store for _, store in owner._tracker.config.values()]
        for name, value in list(vars(owner).items()):
            if any(value is store for store in stores):
                continue
            if _is_keras_embedding(value):
                setattr(owner, name, replacement_for(owner, value))
            elif isinstance(value, list):
                # Item assignment through the container's own method: on
                # TensorFlow a tracked list keeps its items in a wrapped list.
                for index, item in enumerate(list(value)):
                    if _is_keras_embedding(item):
                        value[index] = replacement_for(owner, item)
            elif isinstance(value, dict):
                for key, item in list(value.items()):
                    if _is_keras_embedding(item):
                        value[key] = replacement_for(owner, item)
    for old, new in replacements.values():
        _take_over_nodes(old, new)
    # Functions traced before the replacement still hold the old layers:
    # Keras's, and keras-hub's `CausalLM.generate_function` (cleared as its
    # own `quantize` does), in the model and in the tasks it holds.
    model.train_function = model.test_function = model.predict_function = None
    for owner in model._flatten_layers(include_self=True):
        if getattr(owner, "generate_function", None) is not None:
            owner.generate_function = None


def _take_over_nodes(old, new):
    """Makes the graph nodes where `old` was called run `new`.

    A model built with the functional API, a subclass's included, runs
    `node.operation` for each node of its graph; the nodes are shared by
    every model whose graph holds them (a backbone inside a task model), so
    rewriting them upgrades all of those at once.
    """
    for node in old._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = tensor._keras_history
            tensor._keras_history = history._replace(operation=new)
    new._inbound_nodes = old._inbound_nodes
    new._outbound_nodes = old._outbound_nodes
    old._inbound_nodes = []
    old._outbound_nodes = []

"""Upgrading existing models in place: every Keras embedding layer becomes ours.

A model reaches its layers in several places, all rewired here: its
attributes and the lists and dicts it holds; the tracker (`_tracker`) whose
`layers` store orders its sub-layers and so its weights; for a model built
with the functional API (`keras.Function`), its graph: `_operations` (what
`layers` and `get_layer` read), `_operations_by_depth`, the nodes where each
layer was called (`_inbound_nodes`, with `node.operation`) and `_nodes`, the
keys `f"{id(layer)}_ib-{node index}"` of the nodes it owns (what `get_config`,
saving and `summary` read); Sequential's inner Functional (`_functional`)
alongside its own `_layers`; and the state Keras keeps once it traced or
compiled the model (traced functions, `_compiled_trainable_state`, PyTorch's
`_torch_params`). Those are private attributes of Keras's objects; no
`keras.src` module is imported.
"""

import contextlib
import sys
import warnings
import weakref
from typing import Any

import keras

from keras_ext_embedding import _layout
from keras_ext_embedding.embedding import Embedding
from keras_ext_embedding.embedding_bag import EmbeddingBag
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
# Each Keras layer replaced so far, with its replacement and the overrides it
# was made with. A second model holding the same layer (a training and an
# inference model built on the same layers) gets the same replacement, so the
# two keep sharing its variables. Weak: an entry goes with the Keras layer.
_REPLACED = weakref.WeakKeyDictionary()


def replace_embeddings(model: keras.Model, **overrides: Any) -> keras.Model:
    """Replaces every Keras embedding layer of `model` by ours, in place.

    `keras.layers.Embedding` becomes `keras_ext_embedding.Embedding` and
    `keras.layers.ReversibleEmbedding` (keras-hub's token embeddings, its
    `keras_hub.layers.ReversibleEmbedding` included) becomes
    `keras_ext_embedding.ReversibleEmbedding`, and keras-rs
    `keras_rs.layers.EmbedReduce` becomes `keras_ext_embedding.EmbeddingBag`
    (the same outputs, except that ours leaves padding out of each bag when
    `mask_zero=True`, where EmbedReduce counts id 0). Each replacement is our
    class's `from_config` of the Keras layer's config (the same name,
    dimensions, `mask_zero`, tied or untied weights, `reverse_dtype`,
    `logit_soft_cap`, dtype policy, LoRA rank and alpha, quantization) with
    the Keras layer's variables assigned, so the model's outputs stay the
    same (lookups bit for bit without LoRA; logits and LoRA rows up to
    float32 rounding, int8 logits bit for bit). Other subclasses of Keras's
    layers are left alone: their call may differ.

    Every kind of model changes in place, and the same model object is
    returned (so `model = replace_embeddings(model)` works too): Functional
    and Sequential models, models nested in them (a Functional model inside a
    Sequential one, a model called as a layer), subclassed models (their
    attributes, sub-layers, lists and dicts) and subclasses built with the
    functional API (keras-hub backbones and tasks such as `GPT2CausalLM`).
    Afterwards the model holds our layer wherever it held Keras's: in its
    attributes, `layers`, `get_layer`, `weights` (in the same order, under the
    same paths, so weight files saved before still load), `summary`, its
    `.keras` files, and the nodes of its graph, which run the new layer (in
    every model sharing those nodes: a backbone inside a task model). The
    Keras layers are no longer reachable from the model. To keep the original
    model as it was, upgrade a copy: `keras.models.clone_model(model)` (with
    `set_weights(model.get_weights())`) first.

    A Keras layer is replaced once: another model holding the same layer
    object (a training and an inference model built on the same layers) runs
    the replacement through the graph nodes they share, and gets the same
    replacement object, so its weights stay shared, when `replace_embeddings`
    is called on it in turn (with the same overrides). Call it on each model
    that holds the layer: until then that model's `layers` and `weights`
    still list Keras's layer.

    Functions traced before the call (the model's `predict`, `fit` and
    `evaluate` functions, those of its nested models, and keras-hub's
    `generate_function`) are dropped, so the next call runs the new layers. A
    compiled model stays compiled, with its loss and metrics, and one whose
    optimizer has not been built yet (compiled but never trained, as keras-hub
    tasks are once constructed) trains the new layers' variables from its
    first `fit`. An optimizer already built (the model has run `fit`) only
    knows the old variables: compile the model again before training it (its
    state is not carried over).

    A model that holds no layer to replace is returned unchanged, with a
    warning. A `.keras` file of a keras-hub model reloads as keras-hub builds
    it, with Keras's layers: call `replace_embeddings` again after loading.

    Examples:
        >>> inputs = keras.Input((None,), dtype="int32")
        >>> x = keras.layers.Embedding(1000, 16, name="tokens")(inputs)
        >>> model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(x))
        >>> keras_ext_embedding.replace_embeddings(model) is model
        True
        >>> type(model.get_layer("tokens")).__module__
        'keras_ext_embedding.embedding'

    Args:
        model: A built `keras.Model`.
        **overrides: Arguments of `keras_ext_embedding.Embedding` to set on
            every replacement, e.g. `invalid_ids="zeros"`.

    Returns:
        `model` itself, now holding our Embedding layers.
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
    layers = _reachable_layers(model)
    olds = [layer for layer in layers if _is_keras_embedding(layer)]
    if not olds:
        warnings.warn(_nothing_to_replace(model, layers), stacklevel=2)
        return model
    # Every replacement is made before the model changes: one that fails
    # (an override our class rejects) leaves the model as it was.
    replacements = {id(old): (old, _replacement_for(old, overrides)) for old in olds}
    for old, new in replacements.values():
        _take_over_nodes(old, new)
        _REPLACED[old] = (new, overrides)
    stores = {
        id(store) for layer in layers for _, store in layer._tracker.config.values()
    }
    owners = [layer for layer in layers if id(layer) not in replacements]
    for owner in owners:
        _rewire(owner, replacements, stores)
    _forget_traced_state(owners)
    return model


def _replacements():
    """REPLACEMENTS, with keras-rs `EmbedReduce` (a subclass of Keras's
    Embedding with a call of its own) becoming our `EmbeddingBag` first when
    keras-rs is imported: a model holding one has imported it. keras-rs is
    not a dependency of this package."""
    keras_rs_layers = getattr(sys.modules.get("keras_rs"), "layers", None)
    embed_reduce = getattr(keras_rs_layers, "EmbedReduce", None)
    if embed_reduce is None:
        return REPLACEMENTS
    return ((embed_reduce, EmbeddingBag), *REPLACEMENTS)


def _replacement_class(layer):
    """Our class replacing `layer`, or None if it is not one of Keras's."""
    for keras_class, ours in _replacements():
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


def _reachable_layers(model):
    """`model` and every layer it holds, each once, in tracking order.

    Besides the tracked sub-layers, the layers held in attributes outside
    Keras's tracking: Sequential's inner Functional (`_functional`), which
    runs its graph.
    """
    found = {}
    pending = [model]
    while pending:
        layer = pending.pop(0)
        if id(layer) in found:
            continue
        found[id(layer)] = layer
        pending.extend(layer._flatten_layers(include_self=False, recursive=False))
        pending.extend(
            value
            for _, value in _attributes(layer)
            if isinstance(value, keras.layers.Layer)
        )
    return list(found.values())


def _attributes(owner):
    """`owner`'s attributes as `(name, value)` pairs. On PyTorch layers are
    `torch.nn.Module`s, which keep their sub-modules in `_modules`."""
    attributes = dict(vars(owner))
    modules = attributes.pop("_modules", None)
    if isinstance(modules, dict):
        attributes.update(modules)
    return list(attributes.items())


def _replacement_for(old, overrides):
    """Our layer for the Keras layer `old`: the one made when a model sharing
    `old` was upgraded, or a new one from its config, holding its variables."""
    if old in _REPLACED:
        new, made_with = _REPLACED[old]
        if made_with != overrides:
            raise ValueError(
                f"Layer '{old.name}' was already replaced, with overrides "
                f"{made_with}, by `replace_embeddings` on another model that "
                "holds it; this model gets the same replacement, so that the "
                "two keep sharing its weights. Call `replace_embeddings` with "
                f"the same overrides. Received: overrides={overrides}."
            )
        return new
    config = {**old.get_config(), **overrides}
    new = _replacement_class(old).from_config(config)
    # Built under the old layer's parent scope, its variables get the old
    # variables' paths (e.g. "recommender/users/embeddings").
    parent = old.path.rpartition("/")[0] if old.path else ""
    with keras.name_scope(parent) if parent else contextlib.nullcontext():
        new.build()
    _copy_variables(old, new)
    return new


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
        _layout.assign(new, keras.ops.convert_to_numpy(old))


def _take_over_nodes(old, new):
    """Makes the graph nodes where `old` was called run `new`.

    A model built with the functional API (a Sequential model's inner
    Functional, a subclass's included) runs `node.operation` for each node of
    its graph. The nodes are shared by every model whose graph holds them (a
    backbone inside a task model), so rewriting them upgrades all of those at
    once. The nodes are appended to `new`'s (which has some already when it
    replaces `old` in a second model), and their output tensors'
    `_keras_history` names `new` and the node's index there.
    """
    offset = len(new._inbound_nodes)
    for index, node in enumerate(old._inbound_nodes):
        node.operation = new
        for tensor in node.outputs:
            tensor._keras_history = tensor._keras_history._replace(
                operation=new, node_index=offset + index
            )
    new._inbound_nodes = [*new._inbound_nodes, *old._inbound_nodes]
    new._outbound_nodes = [*new._outbound_nodes, *old._outbound_nodes]
    old._inbound_nodes = []
    old._outbound_nodes = []


def _rewire(owner, replacements, stores):
    """Puts each replacement where `owner` holds the layer it replaces."""

    def new_for(value):
        old, new = replacements.get(id(value), (None, None))
        return new if value is old else None

    # The owner's tracker lists its sub-layers (and so its weights) in order:
    # the replacement takes the old layer's place.
    for old, new in replacements.values():
        if owner._tracker.is_in_store("layers", old):
            owner._tracker.replace_tracked_value("layers", old, new)
    attributes = [(n, v) for n, v in _attributes(owner) if id(v) not in stores]
    # Attributes first: on TensorFlow, setting one also replaces the layer in
    # the object's checkpoint dependencies, provided its dict of them
    # (walked next) still names the old layer.
    for name, value in attributes:
        if new_for(value) is not None:
            setattr(owner, name, new_for(value))
    for _, value in attributes:
        _replace_items(value, new_for, stores, seen=set())
    graph_nodes = getattr(owner, "_nodes", None)
    if isinstance(owner, keras.Function) and isinstance(graph_nodes, set):
        _rekey_nodes(owner, graph_nodes, replacements)


def _rekey_nodes(function, graph_nodes, replacements):
    """Keras's keys of the nodes a graph owns, `f"{id(operation)}_ib-{index
    of the node in operation._inbound_nodes}"`, for the nodes that now run a
    replacement (`get_config` and `summary` skip a node without its key)."""
    olds = {str(id(old)) for old, _ in replacements.values()}
    for key in list(graph_nodes):
        if key.partition("_ib-")[0] in olds:
            graph_nodes.discard(key)
    news = {id(new): new for _, new in replacements.values()}
    for nodes in function._nodes_by_depth.values():
        for node in nodes:
            new = news.get(id(node.operation))
            if new is not None:
                index = next(i for i, n in enumerate(new._inbound_nodes) if n is node)
                graph_nodes.add(f"{id(new)}_ib-{index}")


def _replace_items(container, new_for, stores, seen):
    """Replaces the old layers among the items (and keys) of nested lists
    and dicts."""
    if id(container) in stores or id(container) in seen:
        return
    seen.add(id(container))
    if isinstance(container, list):
        for index, item in enumerate(list(container)):
            if new_for(item) is not None:
                _set_item(container, index, new_for(item))
            else:
                _replace_items(item, new_for, stores, seen)
    elif isinstance(container, dict):
        if any(new_for(key) is not None for key in container):
            # Keyed by layer: Keras's `_compiled_trainable_state`.
            items = [(new_for(key) or key, item) for key, item in container.items()]
            container.clear()
            container.update(items)
        for key, item in list(container.items()):
            if new_for(item) is not None:
                container[key] = new_for(item)
            else:
                _replace_items(item, new_for, stores, seen)


def _set_item(container, index, layer):
    """`container[index] = layer`, through the list's own method: on
    TensorFlow a list held in an attribute (a graph's `_operations`) is a
    `ListWrapper` keeping its items in a wrapped list and tracking each as a
    checkpoint dependency."""
    # Once an item is replaced, such a wrapper refuses to be saved (SavedModel
    # export, checkpoints), as it could not restore the list at creation. The
    # replacement stands for the layer the model would have been built with:
    # the wrapper takes its items as if it had been created with them.
    unchanged = getattr(container, "_non_append_mutation", None) is False
    container[index] = layer
    if unchanged and hasattr(container, "_last_wrapped_list_snapshot"):
        container._non_append_mutation = False
        container._last_wrapped_list_snapshot = list(container)


def _forget_traced_state(owners):
    """Drops what Keras built from the old layers."""
    for owner in owners:
        # Functions traced before the replacement still hold the old layers:
        # Keras's, and keras-hub's `CausalLM.generate_function` (cleared as
        # its own `quantize` does), in the model and the models it holds.
        if isinstance(owner, keras.Model):
            owner.train_function = None
            owner.test_function = None
            owner.predict_function = None
        if getattr(owner, "generate_function", None) is not None:
            owner.generate_function = None
        # On PyTorch a layer lists its variables (its sub-layers' included)
        # as torch parameters, tracked again as Keras's `Model.quantize` does.
        if hasattr(owner, "_torch_params"):
            owner._track_variables()


def _nothing_to_replace(model, layers):
    """The warning for a model without a layer to replace."""
    keras_classes = tuple(keras_class for keras_class, _ in _replacements())
    ours = [layer for layer in layers if isinstance(layer, Embedding)]
    changed = [
        layer
        for layer in layers
        if isinstance(layer, keras_classes) and not isinstance(layer, Embedding)
    ]
    message = (
        f"`replace_embeddings` left model '{model.name}' unchanged: it holds "
        "no `keras.layers.Embedding` or `keras.layers.ReversibleEmbedding`, "
        "nor a subclass of either that adds nothing to it. Subclasses of "
        "Keras's layers that override methods are left alone, as their call "
        "may differ"
    )
    message += f" (here {_names(changed)})." if changed else "; this model holds none."
    if ours:
        message += f" Its layers {_names(ours)} are keras_ext_embedding's already."
    return message


def _names(layers):
    return ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in layers)

"""How the layers' variables are laid out over devices (`keras.distribution`).

A table's layout comes from the distribution (a `LayoutMap` rule for its
path, as for any Keras variable); every variable derived from a table (its
row-sparse slots, its int8/int4 scales and zero points, LoRA's adapters, an
untied `reverse_embeddings`) follows it: each dimension that spans the
vocabulary or the embedding width is laid out as the table's, so a rule
written for `.../embeddings` alone (as keras-hub's `get_layout_map` writes)
shards everything the layer holds for it. A rule for a derived variable's own
path still wins. Keras's optimizer does the same for its slots
(`add_variable_from_reference` passes the variable's layout).

`add_weight` is the one place that creates the layers' variables under a
distribution. Keras's `Layer.add_weight` takes no layout, so the derived one
reaches the variable through the distribution Keras asks while creating it
(`Distribution.get_variable_layout`), installed around that one call.

A sharded variable is initialized sharded: Keras computes an initializer's
value whole on one device and then distributes it, unless the initializer
takes a layout or the variable passes 250 MiB per device count. Here the
initializer runs inside a compiled program (`keras.ops.cond`, the public way
to trace a function on every backend) whose result is constrained to the
layout, so XLA partitions it: each device computes its own rows (JAX's
partitionable random bits give the same values as an unsharded call).
"""

import re
import warnings

import keras
import numpy as np
from keras import ops

# What a dimension of a variable spans, rows first (the placement of a
# reverse table transposes them).
ROWS = "rows"
COLUMNS = "columns"
TABLE = (ROWS, COLUMNS)


def add_weight(layer, roles, follows=None, **kwargs):
    """`layer.add_weight(**kwargs)`, laid out after the variable it follows.

    Args:
        layer: The layer creating the variable.
        roles: For each dimension of the variable, what it spans: `ROWS`,
            `COLUMNS`, or None (its own: a rank, groups). Replicated along
            None.
        follows: `(variable, its roles)`: the variable whose layout gives
            each role its mesh axis (the table; the variable itself for a
            slot, with `roles=None` to copy its layout whole), or None for
            a table, laid out by the distribution alone.
        **kwargs: `layer.add_weight`'s arguments.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return layer.add_weight(**kwargs)
    derived = None if follows is None else _derived(roles, *follows)
    laying = _Laying(distribution, derived)
    kwargs["initializer"] = _ShardedInitializer(
        keras.initializers.get(kwargs.get("initializer")), laying
    )
    keras.distribution.set_distribution(laying)
    try:
        variable = layer.add_weight(**kwargs)
    finally:
        keras.distribution.set_distribution(distribution)
    _check_sharded(layer, variable, laying)
    return variable


def assign(variable, value):
    """`variable.assign(value)`, cast to the variable's dtype.

    A host (NumPy) value for a sharded variable is laid out straight onto the
    devices that hold its shards, each receiving its own slice: Keras's
    `assign` would first make it one tensor, whole, on the default device (a
    checkpoint's table, loaded; a replaced layer's table, carried over).
    """
    layout = layout_of(variable) if keras.config.backend() == "jax" else None
    if isinstance(value, np.ndarray) and is_sharded(layout):
        value = keras.distribution.distribute_tensor(value, layout)
    variable.assign(ops.cast(value, variable.dtype))


def layout_of(variable):
    """The `TensorLayout` of `variable` under the current distribution, or
    None (no distribution, or a backend-specific layout)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    layout = distribution.get_variable_layout(variable)
    return layout if isinstance(layout, keras.distribution.TensorLayout) else None


def is_sharded(layout):
    """Whether `layout` splits a dimension over more than one device."""
    if not isinstance(layout, keras.distribution.TensorLayout):
        return False
    mesh = layout.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    return any(axis is not None and sizes[axis] > 1 for axis in layout.axes)


def _derived(roles, variable, variable_roles):
    """The layout of a variable of `roles`, after `variable` (of
    `variable_roles`, or copied whole when `roles` is None)."""
    layout = layout_of(variable)
    if layout is None:
        return None
    if roles is None:
        return keras.distribution.TensorLayout(layout.axes, layout.device_mesh)
    axes = tuple(layout.axes) + (None,) * (len(variable_roles) - len(layout.axes))
    axis_of = {
        role: axis
        for role, axis in zip(variable_roles, axes, strict=True)
        if role is not None
    }
    return keras.distribution.TensorLayout(
        tuple(None if role is None else axis_of.get(role) for role in roles),
        layout.device_mesh,
    )


def _rule(distribution, path):
    """The layout the distribution's own rules give `path`, or None."""
    try:
        return distribution.get_tensor_layout(path)
    except NotImplementedError:  # a distribution without path rules
        return None


class _Laying:
    """The user's distribution, answering `derived` for the variable being
    created unless a rule of its own names that variable's path."""

    def __init__(self, distribution, derived):
        self._distribution = distribution
        self._derived = derived
        self.chosen = None

    def get_variable_layout(self, variable):
        distribution = self._distribution
        if self._derived is None or _rule(distribution, variable.path):
            layout = distribution.get_variable_layout(variable)
        else:
            layout = self._derived
        self.chosen = layout
        return layout

    def __getattr__(self, name):
        return getattr(self._distribution, name)


class _ShardedInitializer:
    """`initializer`, computed sharded by the layout its variable gets."""

    def __init__(self, initializer, laying):
        self.initializer = initializer
        self.laying = laying

    def __call__(self, shape, dtype=None):
        layout = self.laying.chosen
        if keras.config.backend() != "jax" or not is_sharded(layout):
            return self.initializer(shape, dtype=dtype)

        def sharded():
            value = self.initializer(shape, dtype=dtype)
            return keras.distribution.distribute_tensor(value, layout)

        # A constant predicate: both branches are the same program, traced
        # and compiled once with the layout constraint.
        return ops.cond(True, sharded, sharded)


def shard_embeddings(
    layout_map: keras.distribution.LayoutMap,
    layer_name: str = ".*",
    axis: str = "model",
) -> keras.distribution.LayoutMap:
    """Adds rules to `layout_map` that shard Embedding tables by rows.

    For `keras.distribution.ModelParallel` (JAX): each device of the mesh's
    `axis` holds `input_dim / axis_size` rows of the table. Our layers lay
    out everything else after the table (see the sharding guide's table of
    variables): the row-sparse optimizer slots and LoRA's `A` by rows, an
    untied `reverse_embeddings` by vocabulary columns, the int8 / int4 scales
    and zero points by rows; LoRA's `B`, `g_idx` and step counters stay
    whole. Keras's own layers derive nothing, so the rules also name their
    table-derived variables: `lora_embeddings_a` and `reverse_embeddings` as
    above, the forward table's `embeddings_scale` and `embeddings_zero` by
    rows (Keras's optimizer lays out its slots itself). A lookup then gathers
    each id's row from the device that holds it, and a reverse projection
    computes each device's slice of the logits from the rows it holds.

    The rules match variable paths ending in `{layer_name}/embeddings`,
    `/lora_embeddings_a`, `/reverse_embeddings`, `/embeddings_scale` and
    `/embeddings_zero`, anchored at the end, so they never overlap (Keras
    refuses a path that two rules match). A rule of one's own for
    `.../embeddings` alone is enough for our layers: keras-hub's
    `get_layout_map` (Gemma, Llama, Qwen) writes only that one, and an untied
    head of ours follows it where Keras's stays whole on every device.

    Examples:
        >>> devices = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
        >>> mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
        >>> layout_map = keras_ext_embedding.shard_embeddings(
        ...     keras.distribution.LayoutMap(mesh), "tokens")
        >>> layout_map["tokens/embeddings"].axes
        ('model', None)
        >>> layout_map["tokens/lora_embeddings_a"].axes
        ('model', None)
        >>> layout_map["tokens/reverse_embeddings"].axes
        (None, 'model')
        >>> layout_map["tokens/embeddings_scale"].axes
        ('model',)
        >>> print(layout_map["tokens/lora_embeddings_b"])
        None

        On JAX, hand it to `keras.distribution.ModelParallel(layout_map=
        layout_map, batch_dim_name="batch")` and `set_distribution` before
        building the model (the sharding guide shows a whole run).

    Args:
        layout_map: A `keras.distribution.LayoutMap`.
        layer_name: Regular expression for the layers' names (the part of
            the variable path before the variable name). Defaults to every
            layer.
        axis: The mesh axis to shard the rows over.

    Returns:
        The `layout_map`, with the rules added.
    """
    if axis not in layout_map.device_mesh.axis_names:
        raise ValueError(
            f"`axis` must be one of the device mesh's axis names "
            f"{list(layout_map.device_mesh.axis_names)}. Received: axis={axis!r}."
        )
    try:
        re.compile(layer_name)
    except re.error as error:
        raise ValueError(
            "`layer_name` must be a regular expression. Received: "
            f"layer_name={layer_name!r} ({error})."
        ) from error
    layout_map[rf"{layer_name}/embeddings$"] = (axis, None)
    layout_map[rf"{layer_name}/lora_embeddings_a$"] = (axis, None)
    layout_map[rf"{layer_name}/reverse_embeddings$"] = (None, axis)
    # One per row, or `(input_dim, groups)`: the rows first either way. The
    # reverse table's scales are `(input_dim,)` for int8 but `(groups,
    # input_dim)` for grouped int4, which no one rule on the path fits.
    layout_map[rf"{layer_name}/embeddings_scale$"] = (axis,)
    layout_map[rf"{layer_name}/embeddings_zero$"] = (axis,)
    return layout_map


def _check_sharded(layer, variable, laying):
    """Warns where a layout asks to shard `variable` and the backend cannot:
    Keras 3's `keras.distribution` shards variables on JAX only (its
    TensorFlow module is a prototype; PyTorch has no variable layouts)."""
    if keras.config.backend() == "jax" or not is_sharded(
        laying.get_variable_layout(variable)
    ):
        return
    warnings.warn(
        f"Layer '{layer.name}': the distribution lays out `{variable.path}` "
        f"{tuple(variable.shape)} sharded, but `keras.distribution` shards "
        f"variables on the JAX backend only: on {keras.config.backend()} the "
        "variable is whole (replicated) wherever the model runs. Use "
        "KERAS_BACKEND=jax to shard it, or drop the layout rule.",
        stacklevel=4,
    )

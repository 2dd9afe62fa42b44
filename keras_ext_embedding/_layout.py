"""Layout rules for sharding Embedding tables with `keras.distribution`."""

import re


def shard_embeddings(layout_map, layer_name=".*", axis="model"):
    """Adds rules to `layout_map` that shard Embedding tables by rows.

    For `keras.distribution.ModelParallel`: each device of the mesh's `axis`
    holds `input_dim / axis_size` rows of the table and of LoRA's `A`
    (`input_dim x rank`); LoRA's `B` (`rank x output_dim`) and the quantized
    tables' scales stay replicated. A lookup then gathers each id's row from
    the device that holds it, which XLA does for the whole batch at once.

    The rules match variable paths: `{layer_name}/embeddings` and
    `{layer_name}/lora_embeddings_a`, anchored at the end, so they never
    overlap (Keras refuses a path that two rules match). Works for
    `keras_ext_embedding.Embedding` and `keras.layers.Embedding` alike.

    Examples:
        >>> devices = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
        >>> mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
        >>> layout_map = keras_ext_embedding.shard_embeddings(
        ...     keras.distribution.LayoutMap(mesh), "tokens")
        >>> layout_map["tokens/embeddings"].axes
        ('model', None)
        >>> layout_map["tokens/lora_embeddings_a"].axes
        ('model', None)
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
    return layout_map

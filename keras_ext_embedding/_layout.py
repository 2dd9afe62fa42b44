"""Layout rules for sharding Embedding tables with `keras.distribution`."""

import re


def shard_embeddings(layout_map, layer_name=".*", axis="model"):
    """Adds rules to `layout_map` that shard Embedding tables by rows.

    For `keras.distribution.ModelParallel`: each device of the mesh's `axis`
    holds `input_dim / axis_size` rows of the table and of LoRA's `A`
    (`input_dim x rank`), and the same vocabulary entries of an untied
    `ReversibleEmbedding`'s `reverse_embeddings` (`output_dim x input_dim`,
    sharded along its columns); LoRA's `B` (`rank x output_dim`) and the
    quantized tables' scales stay replicated. A lookup then gathers each
    id's row from the device that holds it, and a reverse projection
    computes each device's slice of the logits from the rows it holds, which
    XLA does for the whole batch at once.

    The rules match variable paths: `{layer_name}/embeddings`,
    `{layer_name}/lora_embeddings_a` and `{layer_name}/reverse_embeddings`,
    anchored at the end, so they never overlap (Keras refuses a path that two
    rules match). Works for our `Embedding` and `ReversibleEmbedding` and for
    Keras's alike. keras-hub's own layout maps (`get_layout_map` of Gemma,
    Llama, Qwen) have no rule for `reverse_embeddings`: an untied head is
    then replicated on every device.

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
    return layout_map

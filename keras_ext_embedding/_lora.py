"""LoRA adapters of an Embedding: `A (input_dim, rank)` and `B (rank,
output_dim)`, float32 and trainable, adding `(alpha / rank) * A @ B` to the
table without touching it.

The adapters are attributes of the layer under Keras's names
(`lora_embeddings_a`, `lora_embeddings_b`); this piece creates them, reads
the delta of gathered rows, and resets or removes them.
"""

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import _layout, _projection, _runs


class LoraAdapters:
    """The adapters of `layer`, of its `lora_rank`, scaled by its
    `lora_alpha / lora_rank` (read from the layer, where Keras keeps them)."""

    def __init__(self, layer, a_initializer):
        self.layer = layer
        self.a_initializer = keras.initializers.get(a_initializer)

    @property
    def rank(self):
        return self.layer.lora_rank

    @property
    def alpha(self):
        return self.layer.lora_alpha

    def build(self, b_initializer):
        layer = self.layer
        # Adapters stay float32 whatever the policy: low-precision adapters
        # underflow during fine-tuning. A row-sparse A (the layer's
        # `optimizer`) is never autocast: its step writes all of it back.
        # A spans the table's rows, B its columns: each laid out as those.
        table = (layer._table.variable, _layout.TABLE)
        layer.lora_embeddings_a = _layout.add_weight(
            layer,
            (_layout.ROWS, None),
            table,
            name="lora_embeddings_a",
            shape=(layer.input_dim, self.rank),
            initializer=self.a_initializer,
            dtype="float32",
            regularizer=layer.embeddings_regularizer,
            autocast=layer._row_sparse_rule is None,
        )
        layer.lora_embeddings_b = _layout.add_weight(
            layer,
            (None, _layout.COLUMNS),
            table,
            name="lora_embeddings_b",
            shape=(self.rank, layer.output_dim),
            initializer=keras.initializers.get(b_initializer),
            dtype="float32",
            regularizer=layer.embeddings_regularizer,
        )

    def remove(self):
        del self.layer.lora_embeddings_a
        del self.layer.lora_embeddings_b

    @property
    def scale(self):
        return self.alpha / self.rank

    @property
    def a(self):
        return self.layer.lora_embeddings_a

    @property
    def b(self):
        return self.layer.lora_embeddings_b

    def rows(self, index, reader=None, a_training=None, touched=None):
        """The delta of the rows at `index`: `scale * A[index] @ B`, without
        the `input_dim x output_dim` product. While `a_training` (A's
        row-sparse training state) trains A, its lookup reads A's rows and
        `touched` says which it may step; otherwise `reader` (a
        `_runs.RowReader`) reads them."""
        b = self.b
        if self.scale != 1:
            # Scaling B (rank x output_dim) costs less than scaling the rows.
            b = ops.multiply(b, self.scale)
        if a_training is not None:
            a_rows = a_training.rows(index, touched)
        else:
            a_rows = (reader or _runs.RowReader()).rows(self.a, index)
        return ops.matmul(a_rows, b)

    def project(self, hidden):
        """The delta of the projection `hidden @ (scale * A @ B)^T`, as
        `scale * (hidden @ B^T) @ A^T`: two thin products, float32, without
        the `input_dim x output_dim` delta.

        The adapters are cast too: under a mixed policy Keras reads them in
        the compute dtype inside the layer's call (its top-level autocast
        scope ignores `layer.autocast`), and PyTorch's einsum did not promote
        mixed operands (a tied LoRA call under `mixed_float16` crashed).
        Both products are table-first matmuls (`_projection.table_logits`)."""
        hidden = ops.cast(hidden, "float32")
        b, a = (ops.cast(adapter, "float32") for adapter in (self.b, self.a))
        low_rank = _projection.table_logits(hidden, b)
        if self.scale != 1:
            low_rank = ops.multiply(low_rank, self.scale)
        return _projection.table_logits(low_rank, a)

    def delta(self):
        """The whole `scale * A @ B`, float32: for merging, never a lookup."""
        return self.scale * ops.matmul(self.a, self.b)

    def stored(self):
        """The three checkpoint entries after the table's: A, B, alpha."""
        return [self.a, self.b, np.asarray([self.alpha], dtype="float64")]

    def reset(self):
        """Starts afresh: A from its initializer, B at zero."""
        a, b = self.a, self.b
        a.assign(self.a_initializer(a.shape, dtype=a.dtype))
        b.assign(ops.zeros(b.shape, dtype=b.dtype))

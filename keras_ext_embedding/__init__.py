"""keras_ext_embedding: a drop-in `keras.layers.Embedding`, safe on bad ids,
fast with LoRA and quantization, and lossless when saved, on TensorFlow, JAX
and PyTorch."""

from keras_ext_embedding._layout import shard_embeddings
from keras_ext_embedding._replace import replace_embeddings
from keras_ext_embedding.embedding import Embedding
from keras_ext_embedding.embedding_bag import EmbeddingBag
from keras_ext_embedding.errors import InvalidIdError
from keras_ext_embedding.reversible_embedding import ReversibleEmbedding
from keras_ext_embedding.shared_embedding import SharedEmbedding

__version__ = "0.1.0"
__all__ = [
    "Embedding",
    "EmbeddingBag",
    "InvalidIdError",
    "ReversibleEmbedding",
    "SharedEmbedding",
    "__version__",
    "replace_embeddings",
    "shard_embeddings",
]

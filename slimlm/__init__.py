"""slimlm: make language models smaller, cheaper and faster without losing quality.

The public API is re-exported here; nothing else needs a deep import::

    from slimlm import ModelConfig, Transformer, prepare_data, TrainConfig, train, generate
"""

from slimlm import hf
from slimlm.data import (
    BPETokenizer,
    ByteTokenizer,
    DataBundle,
    TokenData,
    bits_per_byte,
    load_texts,
    load_tokenizer,
    perplexity,
    prepare_data,
    train_tokenizer,
)
from slimlm.generate import (
    DenseCache,
    GenerationResult,
    KVCache,
    SamplingConfig,
    StaticCache,
    generate,
    make_cache,
    register_cache,
)
from slimlm.model import PRESETS, ModelConfig, Transformer
from slimlm.train import (
    TrainConfig,
    TrainResult,
    evaluate,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ModelConfig", "Transformer", "__version__", "hf",
    "BPETokenizer", "ByteTokenizer", "DataBundle", "TokenData", "bits_per_byte", "load_texts",
    "load_tokenizer", "perplexity", "prepare_data", "train_tokenizer",
    "DenseCache", "GenerationResult", "KVCache", "SamplingConfig", "StaticCache", "generate",
    "make_cache", "register_cache",
    "TrainConfig", "TrainResult", "evaluate", "load_checkpoint", "load_model", "save_checkpoint",
    "train",
]

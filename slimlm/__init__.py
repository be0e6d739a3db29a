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
    CapturedStep,
    TrainConfig,
    TrainResult,
    evaluate,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train,
)

__version__ = "0.1.0"

# Technique modules load on first use (``slimlm.quant``, ``slimlm.attention`` ...): some
# import Triton, which takes seconds, and none is needed to train or generate.
_LAZY_MODULES = ("attention", "bench", "checkpointing", "demo", "kernels", "kvcache", "lora",
                 "precision", "quant")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(f"slimlm.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'slimlm' has no attribute {name!r}")

__all__ = [
    "CapturedStep", "PRESETS", "ModelConfig", "Transformer", "__version__", "hf",
    "BPETokenizer", "ByteTokenizer", "DataBundle", "TokenData", "bits_per_byte", "load_texts",
    "load_tokenizer", "perplexity", "prepare_data", "train_tokenizer",
    "DenseCache", "GenerationResult", "KVCache", "SamplingConfig", "StaticCache", "generate",
    "make_cache", "register_cache",
    "TrainConfig", "TrainResult", "evaluate", "load_checkpoint", "load_model", "save_checkpoint",
    "train",
]

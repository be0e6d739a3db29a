"""slimlm: make language models smaller, cheaper and faster without losing quality."""

from slimlm.model import PRESETS, ModelConfig, Transformer

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "Transformer", "__version__"]

"""Reference models for quality benchmarks, trained by slimlm on the default corpus.

No model hub is reachable, so every quality comparison (quantization, KV caches, LoRA,
precision) starts from a model slimlm trains itself: a preset trained for a fixed number
of steps on the standard-library corpus. The result is cached on disk (by preset, steps,
sequence length and corpus size), so the suites of one benchmark session train it once.

Example::

    from slimlm.bench.reference import reference_model
    model, data = reference_model("tiny", steps=400, device="cpu")
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from slimlm.model import PRESETS, ModelConfig, Transformer

#: Training settings per preset: (batch, seq_len, lr, vocab size, corpus bytes).
_SETTINGS: dict[str, tuple[int, int, float, int, int | None]] = {
    "tiny": (16, 128, 3e-3, 2048, 6_000_000),
    "small": (16, 256, 2e-3, 4096, 12_000_000),
    "llama-50m": (32, 512, 1e-3, 8192, None),
    # r=16 all-linear LoRA is 1.8% of its parameters (the LoRA quality goal's setting)
    "llama-400m": (16, 1024, 6e-4, 32000, 40_000_000),
}


def cache_root() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def reference_model(preset: str = "tiny", *, steps: int = 400, device: str | torch.device = "cpu",
                    progress: bool = True, max_bytes: int | None = None
                    ) -> tuple[Transformer, Any]:
    """A ``preset`` model trained ``steps`` steps on the default corpus (cached), in eval
    mode on ``device``, and its :class:`slimlm.data.DataBundle`. ``max_bytes`` overrides
    the preset's corpus size (quick runs)."""
    if preset not in _SETTINGS:
        raise ValueError(f"preset={preset!r}: reference models exist for {sorted(_SETTINGS)}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: not in slimlm.model.PRESETS")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected a positive number of steps")
    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    batch, seq_len, lr, vocab, default_bytes = _SETTINGS[preset]
    max_bytes = max_bytes or default_bytes
    folder = cache_root() / "reference" / f"{preset}-{steps}-{seq_len}-{max_bytes}"
    data = sdata.prepare_data(None, folder / "data", vocab_size=vocab, max_bytes=max_bytes,
                              progress=progress)
    ckpt = folder / "run" / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        model = strain.load_model(ckpt, device=str(device))
        return model.eval(), data
    cfg = ModelConfig.from_preset(preset, vocab_size=data.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    dev = torch.device(device)
    tcfg = strain.TrainConfig(batch_size=batch, seq_len=min(seq_len, cfg.max_seq_len),
                              steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                              eval_every=0, eval_batches=10, device=str(dev),
                              precision="bf16-mixed" if dev.type == "cuda" else "fp32",
                              compile=dev.type == "cuda", out_dir=str(folder / "run"), seed=0)
    strain.train(model, data, tcfg, progress=progress)
    return model.to(dev).eval(), data


def reference_seq_len(preset: str) -> int:
    """The sequence length a reference model was trained (and should be evaluated) at."""
    return _SETTINGS[preset][1]

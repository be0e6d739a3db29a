"""Training loop, evaluation and checkpoints for slimlm's decoder.

``train`` runs AdamW (decoupled weight decay on matrices only) with a linear warm-up and a
cosine decay to ``min_lr``, gradient clipping and gradient accumulation, evaluates on the
validation split every ``eval_every`` steps (loss, perplexity and bits per byte), shows a
tqdm bar with the loss, tokens/s and model FLOPs utilisation (MFU), appends every logged
row to ``out_dir/history.jsonl`` and saves checkpoints to ``out_dir/checkpoint``.

A checkpoint is a folder::

    model.safetensors   the weights (a tied embedding/LM head is stored once)
    config.json         the ModelConfig
    tokenizer.json      the tokenizer (when given), so the folder alone can generate text
    trainer_state.pt    optimizer, LR scheduler and RNG states (torch CPU/CUDA, the batch
                        sampler, Python, NumPy) and the step
    train_config.json   the TrainConfig

It is written into a temporary folder beside the target and renamed over it only once
complete, so a crash while saving leaves the previous checkpoint intact. Resuming restores
every piece of state, so on the CPU in fp32 a resumed run reproduces the uninterrupted
run's losses bit for bit.

Mixed precision (``precision=``: "fp32", "tf32", "bf16-mixed", "bf16-pure", "fp16-mixed"
with a dynamic loss scale, "fp8"; see ``slimlm.precision``) and activation checkpointing
(``checkpointing=``: "none", "full", "every:N", "selective", "budget:F", "offload"; see
``slimlm.checkpointing``) are dispatched through ``precision_context``/``forward_backward``
and ``apply_checkpointing``. The fp16 loss scale and skipped steps are logged and shown in
the progress bar, and the loss-scaler state is saved in checkpoints so a resume is exact.
Under "bf16-pure" the model is trained (and left) in bf16; under "fp8" its linear layers
are swapped for ``Float8Linear`` during training and swapped back at the end.

Example::

    from slimlm import ModelConfig, Transformer
    from slimlm.data import prepare_data
    from slimlm.train import TrainConfig, train

    data = prepare_data(None, "runs/data", vocab_size=2048)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=data.tokenizer.vocab_size))
    result = train(model, data, TrainConfig(steps=300, batch_size=16, seq_len=128,
                                            out_dir="runs/tiny"))
    print(result.final_eval["bpb"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimlm import checkpointing as _checkpointing
from slimlm import precision as _precision
from slimlm._checks import parse_device
from slimlm._io import atomic_write_text as _atomic_write_text
from slimlm._io import replace_dir
from slimlm.model import ModelConfig, Transformer

PRECISIONS = _precision.POLICIES
CHECKPOINT_POLICIES = _checkpointing.POLICIES
#: torch.compile modes TrainConfig.compile takes besides True/False ("reduce-overhead":
#: the compiled forward and backward replay as CUDA graphs, which a host-bound step, e.g.
#: fp8 at small batches, needs: see the README).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes among them that replay CUDA-graph trees (torch._inductor.list_mode_options).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoint"

# Dense bf16 tensor-core peak (FLOP/s) by GPU name, for MFU. Unknown GPUs show "-".
PEAK_BF16_FLOPS: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train. Validated on construction; ``to_dict``/``from_dict`` round-trip JSON.

    ``batch_size`` is the number of sequences per optimizer step; each forward/backward
    sees ``batch_size // grad_accum`` of them, so ``grad_accum`` trades memory for time
    without changing the maths. ``warmup_steps`` ramp the LR linearly to ``lr``, then a
    cosine brings it to ``min_lr`` at the last step (a warm-up longer than the run never
    reaches ``lr``). ``weight_decay`` applies to matrices
    (dim >= 2: projections and the embedding) only, never to norms. ``grad_clip`` = 0
    disables clipping; ``eval_every`` = 0 evaluates only at the end; ``save_every`` = 0
    saves only at the end (when ``out_dir`` is set). ``compile``: torch.compile the model on
    a GPU (True, or a mode of :data:`COMPILE_MODES`). ``cuda_graph``: on a GPU, each step's
    forward and backward run as a replayed CUDA graph (:class:`CapturedStep`, captured on
    the first batch; the optimizer stays eager), which removes the host's launch cost from
    small-kernel steps such as LoRA fine-tuning; not with ``compile``, ``fp16-mixed`` (its
    loss scale lives on the host) or checkpointing (untried under capture). Ignored on the
    CPU.
    """

    batch_size: int = 16
    seq_len: int = 128
    steps: int = 300
    lr: float = 3e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    checkpointing: str = "none"
    compile: bool | str = False
    cuda_graph: bool = False
    out_dir: str | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise ValueError(f"TrainConfig.{name}={v!r}: expected {what}")

        def number(name: str, *, low: float, strict: bool) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= low if strict else v < low):
                raise ValueError(f"TrainConfig.{name}={v!r}: expected a finite number "
                                 f"{'>' if strict else '>='} {low}")
            return float(v)

        for name in ("batch_size", "seq_len", "steps", "grad_accum", "log_every",
                     "eval_batches"):
            positive_int(name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            positive_int(name, minimum=0)
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size}: expected a multiple of "
                f"grad_accum={self.grad_accum} (each step splits the batch into grad_accum "
                "equal micro-batches)")
        self.lr = number("lr", low=0.0, strict=True)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.min_lr = number("min_lr", low=0.0, strict=False)
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr!r}: expected at most "
                             f"lr={self.lr!r}")
        self.weight_decay = number("weight_decay", low=0.0, strict=False)
        self.eps = number("eps", low=0.0, strict=True)
        self.grad_clip = number("grad_clip", low=0.0, strict=False)
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                           and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"TrainConfig.betas={betas!r}: expected two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda")
                or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"TrainConfig.device={self.device!r}: expected 'auto', 'cpu', "
                             "'cuda' or 'cuda:N'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: expected one of "
                             f"{PRECISIONS}")
        try:
            self.checkpointing = _checkpointing.validate_policy(self.checkpointing)
        except (ValueError, TypeError):
            raise ValueError(f"TrainConfig.checkpointing={self.checkpointing!r}: expected one "
                             f"of {CHECKPOINT_POLICIES} (e.g. 'every:2', 'budget:0.5', "
                             "'selective+offload')") from None
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile={self.compile!r}: expected True, False or a "
                             f"torch.compile mode, one of {COMPILE_MODES}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"TrainConfig.cuda_graph={self.cuda_graph!r}: expected True or "
                             "False")
        if self.cuda_graph:
            for bad, why in ((self.compile, f"compile={self.compile!r} (choose one)"),
                             (self.precision == "fp16-mixed", "precision='fp16-mixed' (its "
                              "loss scale is a host float a graph would freeze)"),
                             (self.checkpointing != "none", f"checkpointing="
                              f"{self.checkpointing!r} (not tried under capture yet)")):
                if bad:
                    raise ValueError(f"TrainConfig.cuda_graph=True does not work with {why}")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)):
                raise ValueError(f"TrainConfig.out_dir={self.out_dir!r}: expected a path or "
                                 "None")
            self.out_dir = os.fspath(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}; expected some of "
                             f"{sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> TrainConfig:
        return cls.from_dict(json.loads(s))


@dataclass
class TrainResult:
    """What ``train`` returns. ``history`` holds every logged row (``step``, ``loss``,
    ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``) and evaluation row (``step``,
    ``val_loss``, ``val_bpb``, ``val_ppl``); ``tokens`` and ``seconds`` count this call
    only (a resumed run does not count the steps before the checkpoint)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    seconds: float = 0.0
    tokens: int = 0


# ---------------------------------------------------------------------------------------
# Pieces of the loop: device, precision, checkpointing, optimizer, schedule
# ---------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU. Asking for CUDA without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device, expected="'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA GPU is available on this machine; "
                             "expected 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) present")
    return dev


def precision_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The forward-pass context of a precision policy (``slimlm.precision``): "fp32" and
    "tf32" switch TF32 off/on, the others autocast to bf16 (fp16 for "fp16-mixed")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return _precision.get_policy(precision).autocast(device_type)


def apply_checkpointing(model: nn.Module, policy: str,
                        probe: Callable[[], Any] | None = None, compiled: bool = False) -> Any:
    """Activation checkpointing of the blocks of ``model.layers`` under ``policy`` (see
    ``slimlm.checkpointing``; "none" undoes any). Parameters and state-dict keys are
    untouched; each block's forward is replaced by an instance attribute (a
    ``functools.partial``, so deepcopy follows). "budget:F" needs ``probe``, a callable
    running one forward; ``compiled``: the step will run under torch.compile (prices
    selective checkpointing without its eager per-op overhead). Returns the
    ``checkpointing.Plan``."""
    _checkpointing.validate_policy(policy)  # a ValueError naming the policy, before work
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"model={type(model).__name__}: expected a model with a "
                        "`layers` nn.ModuleList of blocks")
    if policy == "none":
        _checkpointing.remove_(layers)
        return _checkpointing.Plan(policy="none", modes=["save"] * len(layers))
    return _checkpointing.apply_(layers, policy, probe=probe, compiled=compiled)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters: weight decay on matrices (dim >= 2), none on
    vectors (norm gains, biases). Fused kernel on CUDA, foreach (multi-tensor) on CPU."""
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated, so a tied embedding appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kwargs: dict[str, Any] = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up ``lr * (step + 1) / warmup_steps`` (so no step is wasted at lr 0 and
    step ``warmup_steps - 1`` is at ``lr``), then a cosine from ``lr`` at step
    ``warmup_steps`` to ``min_lr`` at the last step ``steps - 1``; ``min_lr`` after that.
    """
    if step < 0:
        raise ValueError(f"step={step}: expected a non-negative step")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following ``lr_at``. The factor is a plain closure, so the scheduler's
    state_dict holds only numbers and loads with ``weights_only=True``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every random stream training draws from, as tensors/plain types (weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
    }
    if generator is not None:
        state["batches"] = generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if generator is not None and "batches" in state:
        generator.set_state(state["batches"])


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's wrapper (its state-dict keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def _unloadable(obj: Any) -> str | None:
    """Why ``torch.load(weights_only=True)`` (how checkpoints are read back) would refuse
    ``obj``, or None: tried on an in-memory copy (``extra`` is small by design)."""
    import io

    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception as e:
        return str(e).splitlines()[0][:200] or type(e).__name__
    return None


def save_checkpoint(folder: str | os.PathLike, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0,
                    train_config: TrainConfig | dict[str, Any] | None = None,
                    tokenizer: Any = None, rng_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None,
                    precision_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically and return its path.

    Everything goes into a temporary folder beside ``folder``; only when it is complete is
    the old checkpoint moved aside, the new one renamed into place and the old one
    deleted. A failure at any point leaves the previous checkpoint as it was.
    """
    model = _unwrap(model)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"model={type(model).__name__}: expected a slimlm Transformer "
                        "(with a ModelConfig at .cfg)")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r}: expected a non-negative integer")
    if train_config is not None and not isinstance(train_config, (TrainConfig, dict)):
        raise ValueError(f"train_config={train_config!r}: expected a TrainConfig, a dict or "
                         "None")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError(f"extra={type(extra).__name__}: expected a dict or None")
        bad = _unloadable(extra)
        if bad is not None:
            raise ValueError(f"extra: could not be loaded back from the checkpoint "
                             f"(torch.load(weights_only=True): {bad}); keep to tensors, "
                             "numbers, strings and containers of them")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer={optimizer!r}: expected a torch.optim.Optimizer or None")
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise ValueError(f"tokenizer={tokenizer!r}: expected a slimlm tokenizer (with .save) "
                         "or None")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"folder={str(folder)!r}: exists and is not a folder")
    from safetensors.torch import save_model

    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        # save_model drops the second name of a shared (tied) tensor.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_config is not None:
            tc = train_config.to_dict() if isinstance(train_config, TrainConfig) else train_config
            (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(tc, indent=2))
        state: dict[str, Any] = {"step": step}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if rng_state is not None:
            state["rng"] = rng_state
        if extra is not None:
            state["extra"] = extra
        if precision_state is not None:  # the fp16 loss scale: needed for an exact resume
            state["precision"] = precision_state
        torch.save(state, tmp / STATE_FILE)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_model_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        # A save killed between its two renames leaves the previous checkpoint here.
        old = sorted(folder.parent.glob(f".{folder.name}.old-*"))
        hint = f"; the previous checkpoint was left at {str(old[-1])!r}" if old else ""
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist{hint}")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(folder)!r}: missing {CONFIG_FILE}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or not a ModelConfig: "
                         f"{e}") from e


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if da.get(k) != db.get(k)]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                       "F16": torch.float16}


def _load_weights_into(model: nn.Module, path: Path) -> None:
    """Load model.safetensors into ``model`` (tied tensors stored once), converting every
    failure into a ValueError that names the file."""
    from safetensors.torch import load_model

    if not path.is_file():
        raise ValueError(f"checkpoint {str(path.parent)!r}: missing {path.name}")
    device = next(model.parameters()).device
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except Exception as e:  # SafetensorError (corrupt header), RuntimeError (keys/shapes)
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or does not match the "
                         f"model: {type(e).__name__}: {e}") from e


def _weights_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype the weights were saved in (None if unreadable: loading says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    except Exception:
        return None
    return None


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint folder (weights and config only), in the dtype it was
    saved in. The global RNG is left untouched."""
    dev = resolve_device(str(device) if isinstance(device, torch.device) else device)
    folder = Path(folder)
    cfg = _read_model_config(folder)
    # Building the model runs its random init; fork the RNG so loading has no side effect.
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), dev:
        model = Transformer(cfg)
    dtype = _weights_dtype(folder / WEIGHTS_FILE)
    if dtype is not None:
        model.to(dtype)
    _load_weights_into(model, folder / WEIGHTS_FILE)
    return model


def checkpoint_dir(run: str | os.PathLike) -> Path:
    """The checkpoint folder of ``run``: a run folder (holding ``checkpoint/``, as
    ``slimlm train`` and ``slimlm compress`` write) or a checkpoint folder itself."""
    p = Path(run)
    if (p / "checkpoint" / "config.json").exists():
        return p / "checkpoint"
    if (p / "config.json").exists():
        return p
    raise ValueError(f"RUN={str(run)!r}: no checkpoint found (expected {p}/checkpoint/"
                     f"config.json or {p}/config.json); train one with `slimlm train --out RUN`")


def load_run(run: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a run folder or checkpoint: a trained one (:func:`load_model`) or one
    written by ``slimlm compress`` (:func:`slimlm.quant.load_quantized`: quantized layers
    come back packed, without materialising full-precision weights)."""
    ckpt = checkpoint_dir(run)
    if (ckpt / "quant_config.json").exists():
        from slimlm import quant

        return quant.load_quantized(ckpt, device=device)
    return load_model(ckpt, device=device)


def run_source(run: str | os.PathLike) -> Path | None:
    """The run a ``slimlm compress`` output was made from (its ``compress.json``), if
    that folder still holds a checkpoint; None for a trained run or a missing source."""
    p = Path(run)
    meta = p / "compress.json"
    if not meta.is_file() and p.name == "checkpoint":
        meta = p.parent / "compress.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    src = doc.get("source_run") if isinstance(doc, dict) else None
    if not isinstance(src, str) or not src:
        return None
    path = Path(src)
    if not path.is_absolute():  # relative to the compressed run's folder
        path = meta.parent / path
    try:
        checkpoint_dir(path)
    except ValueError:
        return None
    return path


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {str(folder)!r}: missing {STATE_FILE} (a weights-only "
                         "checkpoint cannot resume training)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt: {type(e).__name__}: "
                         f"{e}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt: expected a dict with "
                         "a 'step'")
    tc_path = folder / TRAIN_CONFIG_FILE
    if tc_path.is_file():
        try:
            state["train_config"] = json.loads(tc_path.read_text())
        except ValueError as e:
            raise ValueError(f"checkpoint file {str(tc_path)!r} is corrupt: {e}") from e
    else:
        state["train_config"] = None
    return state


def load_checkpoint(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                    model_config_check: ModelConfig | None = None
                    ) -> tuple[Transformer, dict[str, Any]]:
    """The model of a checkpoint and its trainer state: a dict with ``step``,
    ``optimizer``, ``scheduler``, ``rng`` (each present when saved), ``train_config``
    (a dict or None) and ``extra``. With ``model_config_check``, a checkpoint of another
    model shape raises a ValueError naming the differing fields."""
    folder = Path(folder)
    cfg = _read_model_config(folder)
    if model_config_check is not None:
        diff = _config_diff(model_config_check, cfg)
        if diff:
            raise ValueError(f"checkpoint {str(folder)!r} is for another model config "
                             f"(expected vs checkpoint): {'; '.join(diff)}")
    state = _read_state(folder)
    model = load_model(folder, device=device)
    return model, state


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int, seq_len: int,
             max_batches: int | None = None, device: str | torch.device | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and bits per byte of ``model`` on the
    deterministic batches of a TokenData. Bits per byte count ``tokens *
    data.bytes_per_token()`` bytes, so they compare across tokenizers."""
    from slimlm.data import bits_per_byte, perplexity

    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive integer")
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}: expected a positive integer or None")
    if not hasattr(data, "iter_batches"):
        hint = " (pass bundle.val, one split)" if hasattr(data, "val") else ""
        raise ValueError(f"data={type(data).__name__}: expected a TokenData{hint}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is available on this machine")
    mvocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    hi = getattr(data, "max_id", -1)  # TokenData computes it once
    if isinstance(mvocab, int) and isinstance(hi, int) and hi >= mvocab:
        raise ValueError(f"data: token id {hi} is outside the model's vocab_size={mvocab}: "
                         "the data was tokenized for another model")
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for x, y in data.iter_batches(batch_size, seq_len, max_batches=max_batches,
                                      device=dev):
            with precision_context(precision, dev.type):
                _, loss = model(x, y)
            n = y.numel()
            total += float(loss) * n  # fp64 accumulation on the host
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError(f"data has too few tokens ({len(data)}) for one batch of "
                         f"{batch_size} x {seq_len}")
    mean = total / tokens
    num_bytes = tokens * data.bytes_per_token()
    return {"loss": mean, "ppl": perplexity(mean), "bpb": bits_per_byte(mean, tokens, num_bytes),
            "tokens": tokens}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, grad_accum: int,
                     precision: str = "fp32",
                     policy: _precision.PrecisionPolicy | None = None,
                     autocast_cache: bool = True) -> torch.Tensor:
    """Forward and backward over ``grad_accum`` equal micro-batches of (x, y), adding each
    loss / grad_accum into ``.grad`` so the gradient is the full batch's mean-loss
    gradient (multiplied by the loss scale under "fp16-mixed": pass its ``policy``, which
    holds the scale, and finish with ``policy.step``). Returns the batch's mean loss (a
    detached tensor, no host sync). ``autocast_cache=False`` turns off autocast's
    weight-cast cache (for CUDA-graph capture)."""
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r}: expected a positive integer")
    if x.shape[0] % grad_accum != 0:
        raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum={grad_accum} "
                         "equal micro-batches")
    if policy is None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        if precision == "fp16-mixed":
            raise ValueError("precision='fp16-mixed' needs policy= (the PrecisionPolicy that "
                             "holds the loss scale, from slimlm.precision.get_policy)")
        policy = _precision.get_policy(precision)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for xm, ym in zip(x.chunk(grad_accum), y.chunk(grad_accum)):  # each (B/accum, T)
        with policy.autocast(x.device.type, cache=autocast_cache):
            _, loss = model(xm, ym)
        policy.backward(loss / grad_accum)
        total += loss.detach().float()
    return total / grad_accum


class CapturedStep:
    """A training step's forward and backward captured once in a CUDA graph and replayed.

    A fine-tuning step over a frozen base is bound by the host: its kernels are short and
    there are thousands of them per step (3,000+ for a 16-layer model with LoRA on every
    linear layer), and Python plus the dispatcher issue them slower than the GPU runs them.
    A replayed graph issues the whole forward and backward in one call. The optimizer stays
    eager and unchanged (a fused optimizer is a few launches; learning-rate schedules,
    clipping and loss-scale checks work as before)::

        step = CapturedStep(model, loss_and_backward, x, y)   # warm-up, then capture
        for x, y in batches:
            loss = step(x, y)            # copies x, y in, replays; grads land in p.grad
            opt.step()
            opt.zero_grad()              # set_to_none or not: both work

    ``fn(*inputs)`` runs the forward *and* its backward (``loss.backward()``, gradient
    accumulation over micro-batches, a loss scale...) and returns a tensor or a tuple of
    tensors (e.g. the detached loss). The tensors it returns are the graph's static outputs:
    each call overwrites them (``.clone()`` what you keep). ``inputs``: the example batch;
    each tensor argument is copied into a static buffer of the same shape, dtype and
    device, and every later call must pass tensors of those shapes and dtypes (non-tensor
    arguments are fixed at capture and must compare equal).

    Gradients accumulate into the trainable parameters' ``.grad`` tensors as in eager mode
    (allocated before capture, so the graph adds into them); after
    ``zero_grad(set_to_none=True)`` the next call zeroes and re-attaches them. Warm-up:
    ``warmup`` eager runs of ``fn`` on the example batch on a side stream (Triton autotuning,
    cuBLAS workspaces, slimlm's cached casts), whose gradients are discarded; gradients
    the parameters held before are restored after capture, and the model and optimizer are
    not touched. The graph bakes in tensor addresses and Python-side choices: each call
    checks that the model's parameters and buffers are the same tensors, that the frozen
    ones were not changed in place (``_version``), that per-module state such as LoRA's
    active adapters (``_graph_state()``), train/eval modes and the autocast state are as
    at capture, and raises if not (build a new CapturedStep then). The check walks the
    parameters and modules (a few hundred microseconds for a 1B model; ``verify=False``
    skips it).

    Hugging Face models: transformers cannot look at the data while a graph is captured,
    so it builds a full causal mask there (eager runs pass ``is_causal`` to SDPA instead
    when nothing is padded or packed), which made the attention kernels of a llama-1b step
    2.7x slower. Unless the eager warm-up saw packed sequences (several per row, through
    ``position_ids``), the capture runs under :func:`slimlm.hf.causal_mask_skip` and the
    graph computes what eager mode does for unpacked rows; every later batch is then taken
    to be unpacked too (``hf_causal_skip`` says which way it went). Padded batches keep
    their mask either way.

    Without CUDA (or for CPU inputs) there is no graph: each call runs ``fn`` eagerly, so
    the same code runs on the CPU. ``fn`` must not synchronise with the host (no
    ``.item()``, no data-dependent shapes) and must run the same kernels every step: a
    CUDA graph cannot capture otherwise, and capture errors name the cause.
    """

    def __init__(self, model: nn.Module, fn: Callable[..., Any], *inputs: Any,
                 warmup: int = 2, verify: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable that runs forward and backward, got "
                            f"{type(fn).__name__}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup={warmup!r}: expected a positive integer (capture "
                             "needs at least one eager run first)")
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"inputs: expected tensors on one device, got {sorted(devices)}")
        self.model, self.fn, self.verify = model, fn, verify
        # tensors: (shape, dtype, device) to match; anything else: the value itself
        self._spec = [(True, (a.shape, a.dtype, a.device)) if isinstance(a, torch.Tensor)
                      else (False, a) for a in inputs]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graph: Any = None
        self.hf_causal_skip = False
        self.outputs: Any = None
        self.calls = 0
        dev = next(iter(devices)) if devices else (
            self.params[0].device.type if self.params else "cpu")
        if dev != "cuda" or not torch.cuda.is_available():
            return  # eager: __call__ runs fn
        self._static = [a.detach().clone() if isinstance(a, torch.Tensor) else a
                        for a in inputs]
        saved = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        from slimlm.hf import causal_mask_skip, packed_sequences_seen

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), packed_sequences_seen() as packed:
            for _ in range(warmup):
                fn(*self._static)
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:  # the buffers the graph adds into
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        torch._foreach_zero_(self.grads)
        self._key = self._state_key()
        graph = torch.cuda.CUDAGraph()
        # Hugging Face models: no materialised causal mask inside the capture either
        # (unless the example batch packs several sequences per row)
        self.hf_causal_skip = not packed[0]
        skip = causal_mask_skip() if self.hf_causal_skip else contextlib.nullcontext()
        with skip, torch.cuda.graph(graph):
            out = fn(*self._static)
        moved = [i for i, p in enumerate(self.params) if p.grad is not self.grads[i]]
        if moved:
            names = {id(p): n for n, p in model.named_parameters()}
            raise RuntimeError(
                f"CapturedStep: the backward replaced .grad of "
                f"{names.get(id(self.params[moved[0]]), '?')} (and {len(moved) - 1} more) "
                "instead of adding into it, so a replay would not update what the "
                "optimizer reads; is fn calling zero_grad or create_graph=True?")
        self.graph, self.outputs = graph, out
        for g, s in zip(self.grads, saved):  # the user's gradients, as they were
            if s is not None:
                g.copy_(s)

    def _state_key(self) -> tuple:
        dev = "cuda"
        autocast = (torch.is_autocast_enabled(dev),
                    torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        tensors = [*self.model.parameters(), *self.model.buffers()]
        versions = []
        for t in tensors:
            if t.requires_grad:
                continue  # the optimizer updates these in place every step
            try:
                versions.append(t._version)
            except RuntimeError:  # inference tensors carry no version counter
                versions.append(None)
        mods = list(self.model.modules())
        states = tuple(m._graph_state() for m in mods
                       if callable(getattr(m, "_graph_state", None)))
        training = tuple(m.training for m in mods)  # dropout etc. were captured as they were
        return (tuple((t.data_ptr(), t.dtype, t.shape, t.requires_grad) for t in tensors),
                tuple(versions), states, training, autocast)

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self._spec):
            raise TypeError(f"CapturedStep: expected {len(self._spec)} inputs as at capture, "
                            f"got {len(inputs)}")
        for i, (a, (is_tensor, spec)) in enumerate(zip(inputs, self._spec)):
            if is_tensor:
                if not isinstance(a, torch.Tensor) or (a.shape, a.dtype, a.device) != spec:
                    got = (tuple(a.shape), a.dtype, str(a.device)) if isinstance(
                        a, torch.Tensor) else type(a).__name__
                    raise ValueError(f"CapturedStep: input {i} is {got}; the step was captured "
                                     f"for {(tuple(spec[0]), spec[1], str(spec[2]))}")
            elif a != spec:
                raise ValueError(f"CapturedStep: input {i} is {a!r}; the step was captured "
                                 f"with {spec!r} (non-tensor inputs are fixed)")
        self.calls += 1
        if self.graph is None:
            return self.fn(*inputs)
        if self.verify and self._state_key() != self._key:
            raise RuntimeError(
                "CapturedStep: the model changed since capture (a parameter or buffer was "
                "replaced, moved or cast, a frozen weight was changed in place, adapters were "
                "switched, merged or disabled, train/eval mode or autocast differs); build "
                "a new CapturedStep for the model as it is now")
        reattach = []
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                if p.grad is not None:
                    raise RuntimeError(
                        "CapturedStep: a parameter's .grad was replaced by another tensor "
                        "since capture; the graph adds into the tensor it had then (use "
                        "zero_grad(), with or without set_to_none)")
                p.grad = g
                reattach.append(g)
        if reattach:  # zero_grad(set_to_none=True) ran: start these from zero
            torch._foreach_zero_(reattach)
        for s, a in zip(self._static, inputs):
            if isinstance(a, torch.Tensor):
                s.copy_(a)
        self.graph.replay()
        return self.outputs


def _resolve_resume(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder holding ``checkpoint/``."""
    p = Path(path)
    if not (p / CONFIG_FILE).exists() and (p / CHECKPOINT_DIR / CONFIG_FILE).exists():
        return p / CHECKPOINT_DIR
    return p


class _History:
    """Rows in memory and appended to out_dir/history.jsonl (flushed per row, so a crash
    loses nothing that was logged)."""

    def __init__(self, out_dir: Path | None, start_step: int) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = out_dir / HISTORY_FILE if out_dir is not None else None
        if self.path is None:
            return
        # A resumed run drops rows logged after its checkpoint (they are about to be
        # redone); a fresh run starts a new file.
        kept = ""
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept += line + "\n"
                except ValueError:
                    continue  # a torn last line from a crash
        _atomic_write_text(self.path, kept)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _check_inputs(model: nn.Module, data: Any, cfg: TrainConfig) -> None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg={type(cfg).__name__}: expected a TrainConfig")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "cfg", None),
                                                          ModelConfig):
        raise TypeError(f"model={type(model).__name__}: expected a slimlm Transformer")
    for split in ("train", "val"):
        if not hasattr(data, split):
            raise TypeError(f"data={type(data).__name__}: expected a DataBundle with "
                            "train/val TokenData")
    mcfg: ModelConfig = model.cfg
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={cfg.seq_len}: expected at most the model's "
                         f"max_seq_len={mcfg.max_seq_len}")
    tok = getattr(data, "tokenizer", None)
    if tok is not None and tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size={tok.vocab_size} exceeds the model's "
                         f"vocab_size={mcfg.vocab_size}")
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < cfg.seq_len + 2:
            raise ValueError(f"data.{split} has {n} tokens: expected at least seq_len + 2 = "
                             f"{cfg.seq_len + 2}")


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def train(model: Transformer, data: Any, cfg: TrainConfig, *,
          resume_from: str | os.PathLike | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``model`` in place on ``data.train``, evaluating on ``data.val``.

    ``resume_from`` (a checkpoint folder, or a run folder holding ``checkpoint/``)
    restores weights, optimizer, scheduler and every RNG and continues from its step;
    the model must have the checkpoint's config. ``callback`` receives every history row
    as it is made (after that step's checkpoint, if any, is on disk).
    """
    _check_inputs(model, data, cfg)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r}: expected a callable taking each history row")
    if not isinstance(progress, bool):
        raise ValueError(f"progress={progress!r}: expected True or False")
    device = resolve_device(cfg.device)  # before any work: a missing GPU fails here
    resume_path = _resolve_resume(resume_from) if resume_from is not None else None
    state: dict[str, Any] | None = None
    if resume_path is not None:
        ckpt_cfg = _read_model_config(resume_path)
        diff = _config_diff(model.cfg, ckpt_cfg)
        if diff:
            raise ValueError(f"resume_from={str(resume_path)!r} is a checkpoint of another "
                             f"model config (model vs checkpoint): {'; '.join(diff)}")
        state = _read_state(resume_path)
        if not {"optimizer", "scheduler", "rng"} <= set(state):
            raise ValueError(f"resume_from={str(resume_path)!r}: {STATE_FILE} lacks the "
                             "optimizer, scheduler or RNG state needed to resume")
        if state["step"] > cfg.steps:
            raise ValueError(f"resume_from={str(resume_path)!r} is at step {state['step']}, "
                             f"past TrainConfig.steps={cfg.steps}")
        old = state.get("train_config") or {}
        changed = [k for k in ("batch_size", "seq_len", "lr", "min_lr", "warmup_steps",
                               "grad_accum", "precision", "seed")
                   if k in old and old[k] != cfg.to_dict()[k]]
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)} than the "
                          "checkpoint was trained with", stacklevel=2)

    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out_dir / "train_config.json", cfg.to_json())

    model.to(device)
    model.train()
    policy = _precision.get_policy(cfg.precision, seed=cfg.seed)
    policy.prepare_(model)  # bf16-pure: bf16 weights; fp8: Float8Linear swaps (undone below)
    micro = cfg.batch_size // cfg.grad_accum
    if cfg.precision == "fp8":
        # Decide fp8 vs bf16 per layer shape once, before compilation (which cannot time).
        _precision.calibrate_fp8_(model, tokens=micro * cfg.seq_len,
                                  compiled=bool(cfg.compile))
    if cfg.checkpointing != "none":  # undone at the end: the model goes back as it came
        probe = None
        if cfg.checkpointing.startswith("budget"):
            # The planner measures one forward on a batch of its own (its own sampler, and
            # before the RNG is seeded below, so the training stream is untouched).
            px, py = data.train.get_batch(micro, cfg.seq_len, device=device,
                                          generator=torch.Generator().manual_seed(cfg.seed))

            def probe() -> torch.Tensor:
                with policy.autocast(device.type):
                    return model(px, py)[1]
        apply_checkpointing(model, cfg.checkpointing, probe=probe,
                            compiled=cfg.compile and device.type == "cuda")
    optimizer = policy.wrap_optimizer(make_optimizer(model, cfg))
    scheduler = make_scheduler(optimizer, cfg)
    generator = torch.Generator()  # the batch sampler's own stream, saved in checkpoints
    generator.manual_seed(cfg.seed)
    start_step = 0
    if state is not None:
        _load_weights_into(model, resume_path / WEIGHTS_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], generator)
        if "precision" in state and state["precision"].get("policy") == cfg.precision:
            policy.load_state_dict(state["precision"])
        start_step = int(state["step"])
    else:
        torch.manual_seed(cfg.seed)  # dropout; the weights were initialised by the caller

    run_model: nn.Module = model
    if cfg.compile and device.type == "cuda":
        run_model = torch.compile(model, mode=None if cfg.compile in (True, "default")
                                  else cfg.compile)
    captured: CapturedStep | None = None

    tokenizer = getattr(data, "tokenizer", None)
    history = _History(out_dir, start_step)
    flops_tok = model.cfg.flops_per_token(cfg.seq_len)
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def save(step: int) -> None:
        save_checkpoint(out_dir / CHECKPOINT_DIR, model, optimizer=optimizer,
                        scheduler=scheduler, step=step, train_config=cfg, tokenizer=tokenizer,
                        rng_state=_rng_state(generator), precision_state=policy.state_dict())

    def run_eval(step: int) -> dict[str, Any]:
        res = evaluate(model, data.val, batch_size=micro, seq_len=cfg.seq_len,
                       max_batches=cfg.eval_batches, device=device, precision=cfg.precision)
        return {"step": step, "val_loss": res["loss"], "val_bpb": res["bpb"],
                "val_ppl": res["ppl"], "val_tokens": res["tokens"]}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
    postfix: dict[str, str] = {}
    last_eval: dict[str, Any] | None = None
    t_start = time.perf_counter()
    t_log, paused, tokens_since = time.perf_counter(), 0.0, 0
    try:
        for step in range(start_step, cfg.steps):
            x, y = data.train.get_batch(cfg.batch_size, cfg.seq_len, generator=generator,
                                        device=device)  # (B, T) each
            if cfg.cuda_graph and device.type == "cuda":
                if captured is None:  # warm-up and capture on the first batch
                    captured = CapturedStep(model, partial(
                        forward_backward, run_model, grad_accum=cfg.grad_accum,
                        precision=cfg.precision, policy=policy, autocast_cache=False), x, y)
                loss = captured(x, y)  # overwritten by the next step: read it before
            else:
                if run_model is not model and cfg.compile in CUDAGRAPH_MODES:
                    # a new step of the CUDA-graph trees: last step's outputs may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                loss = forward_backward(run_model, x, y, grad_accum=cfg.grad_accum,
                                        precision=cfg.precision, policy=policy)
            grad_norm = None
            policy.unscale_(optimizer)  # fp16: true gradients before clipping
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if policy.step(optimizer):  # fp16: skipped when the gradients overflowed
                scheduler.step()
            else:
                # The schedule follows the step count either way; torch warns about a
                # scheduler step without an optimizer step, which here is intended.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_since += tokens_per_step
            done = step + 1
            rows: list[dict[str, Any]] = []

            if done % cfg.log_every == 0 or done == cfg.steps:
                loss_value = float(loss)  # syncs the device, so the clock below is honest
                elapsed = max(time.perf_counter() - t_log - paused, 1e-9)
                tps = tokens_since / elapsed
                mfu = flops_tok * tps / peak if peak else None
                row = {"step": done, "loss": loss_value, "lr": lr,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": tps, "mfu": mfu, **policy.stats()}
                rows.append(row)
                t_log, paused, tokens_since = time.perf_counter(), 0.0, 0
                postfix.update(loss=f"{loss_value:.4f}", tok_s=_fmt_rate(tps))
                stats = policy.stats()
                if stats:  # fp16-mixed: the loss scale and how many steps it skipped
                    postfix.update(scale=f"{stats['loss_scale']:.0f}",
                                   skipped=str(stats["skipped_steps"]))
                if device.type == "cuda":
                    postfix["mfu"] = f"{mfu * 100:.1f}%" if mfu is not None else "-"
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {done}; lower "
                                             "lr or check the data")

            t_pause = time.perf_counter()
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                last_eval = run_eval(done)
                rows.append(last_eval)
                postfix["val_bpb"] = f"{last_eval['val_bpb']:.4f}"
            if out_dir is not None and ((cfg.save_every and done % cfg.save_every == 0)
                                        or done == cfg.steps):
                save(done)
            paused += time.perf_counter() - t_pause

            for row in rows:
                history.add(row)
                if callback is not None:
                    callback(row)
            if bar is not None:
                if rows:
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if cfg.checkpointing != "none":
            apply_checkpointing(model, "none")
        policy.restore_(model)

    if last_eval is None:  # resumed at the final step: nothing ran, evaluate once
        last_eval = run_eval(start_step)
    final_eval = {"step": last_eval["step"], "loss": last_eval["val_loss"],
                  "ppl": last_eval["val_ppl"], "bpb": last_eval["val_bpb"],
                  "tokens": last_eval["val_tokens"]}
    return TrainResult(history=history.rows, final_eval=final_eval, out_dir=out_dir,
                       seconds=time.perf_counter() - t_start,
                       tokens=(cfg.steps - start_step) * tokens_per_step)

"""Hugging Face interop: slimlm's decoder to and from transformers' ``LlamaForCausalLM``.

slimlm's reference decoder *is* a Llama: the same modules under the same names, only flat.
Hugging Face nests everything but the LM head under ``model.``::

    slimlm                               transformers
    embed_tokens.weight                  model.embed_tokens.weight
    layers.0.self_attn.q_proj.weight     model.layers.0.self_attn.q_proj.weight
    norm.weight                          model.norm.weight
    lm_head.weight                       lm_head.weight

RoPE uses the same half-split layout (dims i and i + head_dim/2 rotate together), so weights
move across without any permutation, and logits agree to float rounding (1e-5 in fp32).
Tied embeddings: HF checkpoints leave ``lm_head.weight`` out when it is tied; slimlm's
state dict lists both names for the one tensor. The mappings below fill in / drop it.

This module also registers slimlm attention functions as transformers attention
implementations (``register_attention``), so a Hugging Face model can run on slimlm's kernels.

transformers is optional (``pip install slimlm[hf]``): it is imported inside the functions
that need it, so ``import slimlm.hf`` always works, and the pure key mappings
(``state_dict_to_hf``, ``hf_module_name``, ...) never need it.

Trade-off: ``to_hf`` builds the HF model normally (random init, then the copy), which
costs time on big models but relies on no private transformers API; ``from_hf`` and
``load_hf_checkpoint`` build slimlm's model on the meta device and adopt the weights.
In bf16/fp16 the two models round differently (HF applies RoPE and the norm weight in the
compute dtype, slimlm in fp32), so logits agree only to that dtype's precision.

Example::

    from slimlm import ModelConfig, Transformer
    from slimlm import hf

    model = Transformer(ModelConfig.from_preset("tiny"))
    hf_model = hf.to_hf(model)                 # a transformers LlamaForCausalLM
    back = hf.from_hf(hf_model)                # a slimlm Transformer
    hf.save_hf_checkpoint(model, "out/tiny")   # config.json + model.safetensors
    same = hf.load_hf_checkpoint("out/tiny")
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slimlm._io import atomic_write_many as _atomic_write_many
from slimlm.model import ModelConfig, Transformer

if TYPE_CHECKING:  # pragma: no cover - typing only
    import transformers

_HF_PREFIX = "model."
_LM_HEAD = "lm_head"
_EMBED_KEY = "embed_tokens.weight"
_HEAD_KEY = "lm_head.weight"
# Attention implementations transformers ships (or treats as built-in); never overridden.
_BUILTIN_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                      "flash_attention_4", "paged|eager")


def _require_transformers() -> Any:
    """Import transformers, or say how to get it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "slimlm.hf needs Hugging Face transformers for this function; install it with "
            "`pip install slimlm[hf]` (or `pip install transformers`)") from e
    return transformers


def _transformers_major(transformers: Any) -> int:
    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover - odd dev versions
        return 5


# ---------------------------------------------------------------------------------------
# Names: pure string mappings, no transformers needed
# ---------------------------------------------------------------------------------------


def hf_module_name(slimlm_name: str) -> str:
    """slimlm module/parameter path -> HF's: ``"layers.0.mlp.up_proj"`` ->
    ``"model.layers.0.mlp.up_proj"``; ``lm_head`` (and the root ``""``) unchanged."""
    if not isinstance(slimlm_name, str):
        raise TypeError(f"slimlm_name={slimlm_name!r}: expected a str")
    if slimlm_name == "" or slimlm_name == _LM_HEAD or slimlm_name.startswith(_LM_HEAD + "."):
        return slimlm_name
    if slimlm_name == "model" or slimlm_name.startswith(_HF_PREFIX):
        raise ValueError(f"slimlm_name={slimlm_name!r}: already a Hugging Face name "
                         "(slimlm's names have no 'model.' prefix)")
    return _HF_PREFIX + slimlm_name


def slimlm_module_name(hf_name: str) -> str:
    """HF module/parameter path -> slimlm's: ``"model.layers.0.mlp.up_proj"`` ->
    ``"layers.0.mlp.up_proj"``; ``lm_head`` unchanged; ``"model"`` (the LlamaModel) -> ``""``."""
    if not isinstance(hf_name, str):
        raise TypeError(f"hf_name={hf_name!r}: expected a str")
    if hf_name == "" or hf_name == _LM_HEAD or hf_name.startswith(_LM_HEAD + "."):
        return hf_name
    if hf_name == "model":
        return ""
    if hf_name.startswith(_HF_PREFIX):
        return hf_name[len(_HF_PREFIX):]
    raise ValueError(f"hf_name={hf_name!r}: expected a LlamaForCausalLM path, starting with "
                     "'model.' or 'lm_head'")


def state_dict_to_hf(sd: dict[str, Any]) -> dict[str, Any]:
    """slimlm state dict (or any dict keyed by slimlm parameter paths, such as LoRA
    weights) -> HF keys. Values are passed through, not copied. Tied embeddings: if
    ``embed_tokens.weight`` is there and ``lm_head.weight`` is not, ``lm_head.weight`` is
    added as the same tensor, since HF's ``LlamaForCausalLM.state_dict()`` lists both."""
    if not isinstance(sd, dict):
        raise TypeError(f"sd: expected a dict, got {type(sd).__name__}")
    out = {hf_module_name(k): v for k, v in sd.items()}
    if _EMBED_KEY in sd and _HEAD_KEY not in sd:
        out[_HEAD_KEY] = sd[_EMBED_KEY]
    return out


def state_dict_from_hf(sd: dict[str, Any]) -> dict[str, Any]:
    """HF ``LlamaForCausalLM`` state dict (or an HF checkpoint's tensors) -> slimlm keys.
    Values are passed through, not copied. RoPE ``inv_freq`` buffers (persisted by some old
    checkpoints) are dropped: slimlm computes them. Tied checkpoints omit
    ``lm_head.weight``; it is added as the embedding tensor."""
    if not isinstance(sd, dict):
        raise TypeError(f"sd: expected a dict, got {type(sd).__name__}")
    out = {slimlm_module_name(k): v for k, v in sd.items()
           if not k.endswith("rotary_emb.inv_freq")}
    if _EMBED_KEY in out and _HEAD_KEY not in out:
        out[_HEAD_KEY] = out[_EMBED_KEY]
    return out


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


def _set_config_dtype(hf_config: Any, dtype: torch.dtype, major: int) -> None:
    # transformers 5 calls it `dtype`; 4.x `torch_dtype`.
    setattr(hf_config, "dtype" if major >= 5 else "torch_dtype", dtype)


def config_to_hf(cfg: ModelConfig) -> transformers.LlamaConfig:
    """The ``LlamaConfig`` of the same architecture. slimlm's ``dropout`` becomes
    ``attention_dropout`` (HF has no residual dropout; eval is unaffected). MoE configs
    have no Llama equivalent and raise ValueError."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg: expected a slimlm ModelConfig, got {type(cfg).__name__}")
    if cfg.moe:
        raise ValueError(f"ModelConfig.moe={cfg.moe!r}: a mixture-of-experts model has no "
                         "LlamaForCausalLM equivalent; expected None")
    if cfg.dim % cfg.n_heads != 0:
        # LlamaConfig validates hidden_size % num_attention_heads even when head_dim is set.
        raise ValueError(f"ModelConfig.dim={cfg.dim}: transformers' LlamaConfig needs a multiple "
                         f"of n_heads={cfg.n_heads} (even with head_dim_override)")
    transformers = _require_transformers()
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        attention_dropout=cfg.dropout,
        mlp_bias=False,
        # slimlm has no tokenizer of its own: claim no special token ids.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _rope_theta(hf_config: Any) -> float:
    """rope_theta from a 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config;
    ValueError for any RoPE variant but the default one."""
    params = getattr(hf_config, "rope_parameters", None)
    field = "rope_parameters"
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
        field = "rope_scaling"
    theta = getattr(hf_config, "rope_theta", None)
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"hf_config.{field}={params!r}: per-layer RoPE settings are not "
                             "supported; expected default RoPE")
        rope_type = params.get("rope_type", params.get("type", "default"))
        extra = set(params) - {"rope_type", "type", "rope_theta"}
        if rope_type != "default" or extra:
            raise ValueError(f"hf_config.{field}={params!r}: slimlm supports only default RoPE "
                             "(no scaling); expected rope_type 'default' and no other keys")
        theta = params.get("rope_theta", theta)
    if theta is None:
        raise ValueError("hf_config.rope_theta: missing (expected a positive float)")
    return float(theta)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """slimlm's ``ModelConfig`` for a ``LlamaConfig`` (or its dict). ValueError naming the
    field for anything slimlm's decoder cannot reproduce (RoPE scaling, biases, another
    activation, another model type)."""
    if isinstance(hf_config, dict):
        # LlamaConfig fills what is missing with Llama-2-7B's values: a dict without the
        # shape fields is more likely a mistake than a request for a 7B model
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads")
                   if k not in hf_config]
        if missing:
            raise ValueError(f"hf_config: the dict lacks {missing}; expected a Llama "
                             "config.json's fields")
        transformers = _require_transformers()
        hf_config = transformers.LlamaConfig.from_dict(hf_config)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads"):
        if not hasattr(hf_config, name):
            raise TypeError(f"hf_config: expected a transformers LlamaConfig, got "
                            f"{type(hf_config).__name__} without {name!r}")
    model_type = getattr(hf_config, "model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"hf_config.model_type={model_type!r}: expected 'llama'")
    checks = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)}
    for name, allowed in checks.items():
        value = getattr(hf_config, name, allowed[0])
        if value not in allowed:
            raise ValueError(f"hf_config.{name}={value!r}: slimlm's decoder supports only "
                             f"{allowed[0]!r}")
    rope_theta = _rope_theta(hf_config)
    n_heads = hf_config.num_attention_heads
    n_kv_heads = getattr(hf_config, "num_key_value_heads", None) or n_heads
    dim = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None)
    default_head_dim = dim // n_heads if dim % n_heads == 0 else None
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        dim=dim,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        mlp_dim=hf_config.intermediate_size,
        max_seq_len=getattr(hf_config, "max_position_embeddings", 2048),
        rope_theta=rope_theta,
        norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
        head_dim_override=None if head_dim in (None, default_head_dim) else int(head_dim),
    )


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def _adopt(cfg: ModelConfig, sd: dict[str, torch.Tensor], training: bool) -> Transformer:
    """A slimlm model that takes ``sd``'s tensors as its parameters (no random init, no copy)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        # assign=True gives each name its own Parameter; re-tie so they stay one.
        model.lm_head.weight = model.embed_tokens.weight
    return model.train(training)


def _clone_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies; entries that are one tensor (tied weights) stay one copy."""
    memo: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if id(v) not in memo:
            memo[id(v)] = v.detach().clone()
        out[k] = memo[id(v)]
    return out


def _refuse_quantized(model: Transformer, caller: str) -> None:
    """Hugging Face's Llama takes full-precision weights: a slimlm-quantized model is saved
    with :func:`slimlm.quant.save_quantized` instead."""
    from slimlm.quant import QuantEmbedding, QuantLinear

    q = [fqn for fqn, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if q:
        raise ValueError(f"{caller}: model has {len(q)} quantized module(s) ({q[0]!r}, ...): "
                         "expected full-precision weights; save it with "
                         "slimlm.quant.save_quantized (or convert before quantizing)")


def to_hf(model: Transformer) -> transformers.LlamaForCausalLM:
    """A new ``LlamaForCausalLM`` holding copies of ``model``'s weights, on the same device,
    in the same dtype and train/eval mode. Example: ``hf_model = to_hf(model).eval()``."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a slimlm Transformer, got {type(model).__name__}")
    _refuse_quantized(model, "to_hf")
    hf_config = config_to_hf(model.cfg)
    transformers = _require_transformers()
    weight = model.embed_tokens.weight
    dtype_kw = "dtype" if _transformers_major(transformers) >= 5 else "torch_dtype"
    attn = model.cfg.attention if model.cfg.attention in ("eager", "sdpa") else "sdpa"
    with torch.device(weight.device):
        hf_model = transformers.LlamaForCausalLM._from_config(
            hf_config, attn_implementation=attn, **{dtype_kw: weight.dtype})
    with torch.no_grad():
        hf_model.load_state_dict(state_dict_to_hf(model.state_dict()), strict=True)
    return hf_model.train(model.training)


def from_hf(hf_model: Any) -> Transformer:
    """A new slimlm ``Transformer`` holding copies of a ``LlamaForCausalLM``'s weights, on
    its device, in its dtype and train/eval mode. Example: ``model = from_hf(hf_model)``."""
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"hf_model: expected a transformers LlamaForCausalLM, got "
                        f"{type(hf_model).__name__}")
    cfg = config_from_hf(hf_model.config)
    sd = _clone_shared(state_dict_from_hf(hf_model.state_dict()))
    return _adopt(cfg, sd, hf_model.training)


# ---------------------------------------------------------------------------------------
# Checkpoint folders (config.json + safetensors), offline
# ---------------------------------------------------------------------------------------

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def load_hf_checkpoint(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> Transformer:
    """A slimlm model from a local Hugging Face Llama folder (``config.json`` plus
    ``model.safetensors`` or sharded ``model-*.safetensors`` with their index). Never
    touches the network. ``dtype`` casts (default: the checkpoint's dtype)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"folder={str(folder)!r}: expected an existing directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"folder={str(folder)!r}: no config.json in it")
    if dtype is not None and (not isinstance(dtype, torch.dtype)
                              or not dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype or None")
    from slimlm.train import resolve_device

    device = resolve_device(str(device) if isinstance(device, torch.device) else device)
    if (path / _WEIGHTS).is_file():
        files = [path / _WEIGHTS]
    elif (path / _INDEX).is_file():
        try:
            weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(path / _INDEX)!r}: not a safetensors index with a "
                             f"weight_map ({e!r})") from e
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{str(path / _INDEX)!r} names shards that are not "
                                    f"there: {missing[:3]}")
    else:
        raise FileNotFoundError(f"folder={str(folder)!r}: expected {_WEIGHTS} or {_INDEX} "
                                "(only safetensors checkpoints are read)")
    transformers = _require_transformers()
    hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cfg = config_from_hf(hf_config)

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f), device=str(device)))
        except Exception as e:  # a damaged or foreign file: say which one
            raise ValueError(f"{str(f)!r}: cannot read it as safetensors ({e})") from e
    sd = state_dict_from_hf(tensors)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    try:
        return _adopt(cfg, sd, training=False)
    except RuntimeError as e:  # load_state_dict: the weights do not fit config.json
        raise ValueError(f"folder={str(folder)!r}: its weights do not match its config.json "
                         f"({str(e).splitlines()[0]})") from e




def save_hf_checkpoint(model: Transformer, folder: str | os.PathLike[str]) -> None:
    """Write ``model`` as a Hugging Face Llama folder: ``config.json`` and
    ``model.safetensors`` (HF keys; tied ``lm_head.weight`` left out, as HF does), readable by
    ``LlamaForCausalLM.from_pretrained(folder)`` and ``load_hf_checkpoint``. Each file is
    written to a temp name and renamed. The folder is created if needed."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a slimlm Transformer, got {type(model).__name__}")
    _refuse_quantized(model, "save_hf_checkpoint")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"folder={str(folder)!r}: exists and is not a directory")
    hf_config = config_to_hf(model.cfg)  # validates before anything is written
    transformers = _require_transformers()
    major = _transformers_major(transformers)
    _set_config_dtype(hf_config, model.embed_tokens.weight.dtype, major)
    hf_config.architectures = ["LlamaForCausalLM"]

    sd = state_dict_to_hf(model.state_dict())
    if model.cfg.tie_embeddings:
        sd.pop(_HEAD_KEY)  # safetensors refuses shared tensors; HF re-ties on load
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config_json = hf_config.to_json_string()
    # weights and config replace the old pair together (never new weights, old config)
    _atomic_write_many({
        path / _WEIGHTS: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        path / "config.json": lambda tmp: Path(tmp).write_text(config_json)})


# ---------------------------------------------------------------------------------------
# Attention: slimlm attention functions as transformers attention implementations
# ---------------------------------------------------------------------------------------


def _hf_attention_adapter(fn: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """Wrap a slimlm attention function (q (B,H,Tq,D), k/v (B,Hkv,Tk,D), causal=, mask=,
    [dropout_p=]) -> (B,H,Tq,D) in transformers' AttentionInterface calling convention."""

    def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
        for name in ("sliding_window", "softcap"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}={kwargs[name]!r}: not supported by slimlm attention")
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        head_dim = query.shape[-1]
        if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
            # slimlm's functions scale by 1/sqrt(D); fold any other scale into the query.
            query = query * (scaling * math.sqrt(head_dim))
        causal, mask = bool(is_causal), None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                # Raw padding mask (B, Tk), 1 = keep (no mask function registered).
                mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
            elif attention_mask.dtype == torch.bool:
                # transformers' 4D mask (B, 1, Tq, Tk), True = keep; it already holds the
                # causal pattern, aligned to the cache (static caches too).
                mask, causal = attention_mask, False
            else:
                # Additive float mask: 0 = keep, dtype-min or -inf = masked.
                mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
                causal = False
        extra = {"dropout_p": dropout} if dropout > 0 else {}
        out = fn(query, key, value, causal=causal, mask=mask, **extra)  # (B, H, Tq, D)
        return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)

    attention_forward._slimlm_attention = fn  # type: ignore[attr-defined]
    return attention_forward


def register_attention(name: str, fn: Callable[..., torch.Tensor]) -> None:
    """Register a slimlm attention function ``fn(q, k, v, *, causal, mask[, dropout_p])``
    with q (B,H,Tq,D), k/v (B,Hkv,Tk,D) as the transformers attention implementation
    ``name``, so ``LlamaForCausalLM.from_pretrained(path, attn_implementation=name)``,
    ``LlamaConfig(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``
    runs on it (transformers 5's ``LlamaForCausalLM.__init__`` takes no such keyword). Masks arrive as transformers'
    4D boolean (sdpa-style) masks, or None for plain causal attention. Registering the same
    name again replaces a previous slimlm registration; built-in names are refused.

    Example: ``register_attention("slimlm_eager", slimlm.model.eager_attention)``.
    """
    if not isinstance(name, str) or not name or name in _BUILTIN_ATTENTION:
        raise ValueError(f"name={name!r}: expected a new non-empty attention name, not one of "
                         f"transformers' built-ins {_BUILTIN_ATTENTION}")
    if not callable(fn):
        raise TypeError(f"fn={fn!r}: expected a callable attention function")
    _require_transformers()
    from transformers import AttentionInterface

    existing = AttentionInterface._global_mapping.get(name)
    if existing is not None and not hasattr(existing, "_slimlm_attention"):
        raise ValueError(f"name={name!r}: already registered in transformers by someone else; "
                         "expected a new name")
    AttentionInterface.register(name, _hf_attention_adapter(fn))
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers pass the raw 2D mask, which the adapter handles
        return
    # Boolean 4D masks (True = keep), None when plain causal is exact: what fn expects.
    AttentionMaskInterface.register(name, sdpa_mask)


@contextlib.contextmanager
def packed_sequences_seen() -> Iterator[list[bool]]:
    """Records whether transformers detected packed sequences (several sequences in one
    row, told apart by restarting ``position_ids``) in the forward passes run inside:
    yields a one-element list, True once any pass saw packing. Used by
    :class:`slimlm.train.CapturedStep` on its eager warm-up before it captures under
    :func:`causal_mask_skip`. Does nothing when transformers is not imported."""
    seen = [False]
    mu = sys.modules.get("transformers.masking_utils")
    find = getattr(mu, "find_packed_sequence_indices", None)
    if find is None:
        yield seen
        return

    def probe(*args: Any, **kwargs: Any) -> Any:
        out = find(*args, **kwargs)
        seen[0] = seen[0] or out is not None
        return out

    with _patched(mu, "find_packed_sequence_indices", probe):
        yield seen


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` while active (None: leave it alone); the old value after."""
    if value is None:
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def causal_mask_skip() -> Iterator[None]:
    """While active, transformers' SDPA masks for unpadded, unpacked causal attention are
    None (SDPA runs with ``is_causal=True``), as they are in eager mode for such inputs.

    transformers decides per forward pass, from the data, whether a causal mask can be
    left out: no padding in ``attention_mask`` and no packed sequences in ``position_ids``.
    While a CUDA graph is being captured it cannot read the data, so it builds the full
    (B, 1, T, T) mask instead (transformers 5.17 on the H200 machine, for every training
    forward: its packed-sequence check); cuDNN attention with an explicit mask computes
    the whole square rather than the causal half, and the attention kernels of a llama-1b
    training step ran 2.7x slower inside the graph. Inside this context rows are taken to
    be single sequences (no packing through ``position_ids``), and an SDPA mask that is
    plain causal without ``attention_mask``, past or sliding window is None. Every other
    mask (padding, a KV cache with a past, windows, custom mask functions) comes from the
    builder that was registered. :class:`slimlm.train.CapturedStep` captures under it
    unless its eager warm-up saw packed sequences (:func:`packed_sequences_seen`). Does
    nothing when transformers is not imported."""
    mu = sys.modules.get("transformers.masking_utils")
    mapping = getattr(getattr(mu, "AttentionMaskInterface", None), "_global_mapping", None)
    original = mapping.get("sdpa") if isinstance(mapping, dict) else None
    if original is None:
        yield
        return
    causal = getattr(mu, "causal_mask_function", None)
    find = getattr(mu, "find_packed_sequence_indices", None)

    def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        q_len = kwargs.get("q_length")
        if q_len is None and isinstance(kwargs.get("cache_position"), torch.Tensor):
            q_len = kwargs["cache_position"].shape[0]
        q_off = kwargs.get("q_offset", 0)
        if (not args and causal is not None and kwargs.get("mask_function") is causal
                and kwargs.get("attention_mask") is None
                and kwargs.get("allow_is_causal_skip", True)
                and kwargs.get("local_size") is None and kwargs.get("kv_offset", 0) == 0
                and (isinstance(q_off, torch.Tensor) or q_off == 0)
                and q_len is not None and q_len == kwargs.get("kv_length")):
            return None  # kv_length == q_length: no past, so is_causal is exact
        return original(*args, **kwargs)

    def unpacked(*args: Any, **kwargs: Any) -> None:
        return None  # one sequence per row (see the docstring)

    mapping["sdpa"] = sdpa_mask
    try:
        with _patched(mu, "find_packed_sequence_indices", unpacked if find else None):
            yield
    finally:
        mapping["sdpa"] = original

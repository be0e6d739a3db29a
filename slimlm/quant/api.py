"""The verbs: ``quantize_``, ``save_quantized``, ``load_quantized``, and size accounting."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm._io import atomic_write_many as _atomic_write_many
from slimlm.kernels.quant_matmul import pack_bits
from slimlm.quant.calibrated import awq_search, gptq_quantize, rtn_dequant_fn
from slimlm.quant.config import QuantConfig
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.formats import hqq_quantize, rtn_quantize
from slimlm.quant.linear import QuantLinear

__all__ = ["load_quantized", "model_size_bytes", "quant_stats", "quantize_", "save_quantized",
           "select_targets"]

FilterFn = Callable[[nn.Module, str], bool]
FORMAT_NAME = "slimlm-quant"
CONFIG_FILE = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
_NONPERSISTENT = "__nonpersistent__."
_LM_HEAD_NAMES = ("lm_head", "output", "embed_out")
_AWQ_MAX_ROWS = 1024  # calibration rows kept per layer for AWQ's grid search


# ---------------------------------------------------------------------------------------
# Selecting targets
# ---------------------------------------------------------------------------------------


def _lm_heads(model: nn.Module) -> set[str]:
    """Paths of the output projection(s): Hugging Face's ``get_output_embeddings()``, a
    Linear named lm_head/output/embed_out, or a Linear whose weight is an embedding's."""
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # models that define the method but not the head
            head = None
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and (
        m is head or fqn.rsplit(".", 1)[-1] in _LM_HEAD_NAMES or id(m.weight) in emb)}


def _matches(fqn: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(fqn, pattern)
    return fqn == pattern or fqn.endswith("." + pattern)


def select_targets(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
                   ) -> list[tuple[str, nn.Linear]]:
    """The ``(path, nn.Linear)`` pairs :func:`quantize_` would replace, in model order.

    TypeError when an explicit target is a leaf that is not ``nn.Linear``; ValueError when
    nothing matches."""
    picked = _select_linears(model, config, filter_fn)
    if not picked:
        raise ValueError(_nothing_matched(config, filter_fn))
    return picked


def _nothing_matched(config: QuantConfig, filter_fn: FilterFn | None) -> str:
    return (f"quantize_: no module matched (targets={config.targets!r}, "
            f"include_lm_head={config.include_lm_head}, include_embeddings="
            f"{config.include_embeddings}, filter_fn={'set' if filter_fn is not None else None}"
            "); expected at least one nn.Linear (or, with include_embeddings, nn.Embedding)")


def _select_linears(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None
                    ) -> list[tuple[str, nn.Linear]]:
    modules = [(fqn, m) for fqn, m in model.named_modules() if fqn]
    chosen: dict[str, nn.Linear] = {}
    if config.targets is None:
        heads = _lm_heads(model)
        for fqn, m in modules:
            if isinstance(m, nn.Linear) and (fqn not in heads or config.include_lm_head):
                chosen[fqn] = m
    else:
        for pattern in config.targets:
            for fqn, m in modules:
                if not _matches(fqn, pattern):
                    continue
                if isinstance(m, nn.Linear):
                    chosen[fqn] = m
                elif isinstance(m, QuantLinear):
                    raise ValueError(f"targets entry {pattern!r} matched {fqn!r}, which is "
                                     "already a QuantLinear")
                elif any(True for _ in m.children()):
                    for sub, c in m.named_modules():
                        if sub and isinstance(c, nn.Linear):
                            chosen[f"{fqn}.{sub}"] = c
                else:
                    raise TypeError(f"targets entry {pattern!r} matched module {fqn!r} of type "
                                    f"{type(m).__name__}; expected nn.Linear (or a module "
                                    "containing nn.Linear)")
    order = {fqn: i for i, (fqn, _) in enumerate(modules)}
    picked = sorted(chosen.items(), key=lambda kv: order[kv[0]])
    if filter_fn is not None:
        picked = [(f, m) for f, m in picked if filter_fn(m, f)]
    return picked


def _select_embeddings(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None,
                       linears: list[tuple[str, nn.Linear]]
                       ) -> list[tuple[str, nn.Embedding, str | None]]:
    """``(path, nn.Embedding, tied head path or None)`` for ``include_embeddings``: every
    embedding ``filter_fn`` accepts. An embedding whose weight is also a Linear's (a tied
    LM head) is quantized through that Linear, which must then be a target too, without
    AWQ (its stored rows would be scaled by the head's input scales)."""
    if not config.include_embeddings:
        return []
    chosen = {fqn for fqn, _ in linears}
    out = []
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.Embedding) or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        heads = [h for h, lin in model.named_modules()
                 if isinstance(lin, nn.Linear) and lin.weight is m.weight]
        head = heads[0] if heads else None
        if head is not None and head not in chosen:
            how = (f"add {head!r} to targets" if config.targets is not None
                   else "pass include_lm_head=True (slimlm compress --lm-head)")
            raise ValueError(f"include_embeddings=True: {fqn!r} is tied to {head!r}, which is "
                             f"not quantized; {how} (one packed table then serves both) or "
                             "keep the embedding in full precision")
        if head is not None and config.awq:
            raise ValueError(f"include_embeddings=True with awq=True: {fqn!r} is tied to "
                             f"{head!r}, whose AWQ input scales would be folded into the "
                             "shared rows; untie them, or quantize without awq")
        if m.weight.is_meta:
            raise ValueError(f"{fqn!r}: weight is on the meta device; quantize_ needs real "
                             "weights")
        d = m.embedding_dim
        if config.group_size is not None and d % config.group_size:
            raise ValueError(f"group_size={config.group_size} does not divide embedding_dim={d} "
                             f"of {fqn!r}; use a group size that divides it, group_size=None, "
                             "or exclude it with filter_fn")
        if (d * config.bits) % 8:
            raise ValueError(f"{fqn!r}: embedding_dim={d} at bits={config.bits} does not pack "
                             "into whole bytes")
        out.append((fqn, m, head))
    return out


def _quantize_embedding(emb: nn.Embedding, config: QuantConfig) -> QuantEmbedding:
    w = emb.weight.detach().float()  # (V, D)
    sdt = config.torch_scale_dtype
    gs = config.group_size or w.shape[1]
    qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, bits=config.bits,
                        group_size=config.group_size, symmetric=bool(config.symmetric),
                        scale_dtype=sdt, compute_dtype=emb.weight.dtype,
                        padding_idx=emb.padding_idx, device=w.device)
    if config.method == "hqq":
        q, scale, zero = hqq_quantize(w, config.bits, gs, sdt)
    else:  # rtn, and gptq (a lookup has no input activations for its Hessian)
        q, scale, zero = rtn_quantize(w, config.bits, gs, bool(config.symmetric), sdt)
    _fill_packed(qe, q, scale, zero, config)
    qe.quant_config = config.to_dict()
    return qe


def _fill_packed(mod: nn.Module, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 config: QuantConfig) -> None:
    """Codes packed into ``mod.qweight``; scales (and zero points, when it has them) in the
    storage dtype: the buffers a QuantLinear and a QuantEmbedding share in layout."""
    sdt = config.torch_scale_dtype
    mod.qweight.copy_(pack_bits(q, config.bits))
    mod.scales.copy_(scale.to(sdt))
    if mod.zeros is not None:
        mod.zeros.copy_(zero.to(sdt))


def _check_shapes(targets: list[tuple[str, nn.Linear]], config: QuantConfig) -> None:
    for fqn, m in targets:
        k = m.in_features
        if config.group_size is not None and k % config.group_size != 0:
            raise ValueError(f"group_size={config.group_size} does not divide in_features={k} "
                             f"of {fqn!r}; use a group size that divides it, group_size=None, "
                             "or exclude the module (slimlm does not pad groups)")
        if (k * config.bits) % 8 != 0:
            raise ValueError(f"{fqn!r}: in_features={k} at bits={config.bits} does not pack "
                             "into whole bytes (3-bit needs a multiple of 8, 2-bit of 4)")
        if m.weight.is_meta:
            raise ValueError(f"{fqn!r}: weight is on the meta device; quantize_ needs real "
                             "weights (use load_quantized for saved quantized models)")


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------


def _iter_calib(calib: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(calib, torch.Tensor):
        ids = calib[None] if calib.dim() == 1 else calib
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i:i + batch_size]  # (b, T)
    else:
        yield from calib


def _vocab_size(model: nn.Module) -> int | None:
    """The model's vocabulary size where it says (slimlm's cfg, a Hugging Face config, or
    its first embedding), else None."""
    for holder in (getattr(model, "cfg", None), getattr(model, "config", None)):
        v = getattr(holder, "vocab_size", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _check_calib(calib: Any, config: QuantConfig, model: nn.Module | None = None) -> None:
    if calib is None:
        if config.needs_calibration:
            raise ValueError(f"calib=None with method={config.method!r}, awq={config.awq}: "
                             "GPTQ and AWQ need calibration token ids (N, T) or batches")
        return
    if isinstance(calib, torch.Tensor):
        if calib.dim() not in (1, 2) or calib.dtype not in (torch.int64, torch.int32) \
                or calib.numel() == 0:
            raise ValueError(f"calib: expected token ids, an integer tensor (N, T), got "
                             f"{calib.dtype} {tuple(calib.shape)}")
        vocab = _vocab_size(model) if model is not None else None
        lo, hi = int(calib.min()), int(calib.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"calib: token ids in [{lo}, {hi}]: expected ids in [0, "
                             f"{vocab - 1 if vocab is not None else 'vocab_size - 1'}] (the "
                             "model's vocabulary); was the data tokenized for another model?")
    elif isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(f"calib={type(calib).__name__}: expected a tensor of token ids (N, T) "
                        "or an iterable of batches")


def _run_model(model: nn.Module, batch: Any, device: torch.device) -> None:
    def mv(t: Any) -> Any:
        return t.to(device) if isinstance(t, torch.Tensor) else t

    if isinstance(batch, dict):
        model(**{k: mv(v) for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*[mv(v) for v in batch])
    else:
        model(mv(batch))


class _Stats:
    """Per-layer calibration statistics: H = 2/n X^T X and (for AWQ) some input rows."""

    def __init__(self, need_h: bool, need_x: bool) -> None:
        self.need_h, self.need_x = need_h, need_x
        self.h: torch.Tensor | None = None
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()  # (R, K)
        if self.need_h:
            if self.h is None:
                self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.h.addmm_(x.t(), x)
            self.n += x.shape[0]
        if self.need_x and self.n_rows < _AWQ_MAX_ROWS:
            take = x[:_AWQ_MAX_ROWS - self.n_rows]
            self.rows.append(take.clone())
            self.n_rows += take.shape[0]

    def hessian(self) -> torch.Tensor | None:
        return None if self.h is None else self.h * (2.0 / max(self.n, 1))

    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)  # (R, K)


def _collect(model: nn.Module, targets: list[tuple[str, nn.Linear]], calib: Any,
             config: QuantConfig, batch_size: int) -> dict[str, _Stats]:
    stats = {fqn: _Stats(config.method == "gptq", config.awq) for fqn, _ in targets}
    hooks = [m.register_forward_pre_hook(stats[fqn]) for fqn, m in targets]
    device = next(iter(model.parameters())).device
    try:
        with torch.no_grad():
            for batch in _iter_calib(calib, batch_size):
                _run_model(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    for fqn, st in stats.items():
        if (st.need_h and st.h is None) or (st.need_x and not st.rows):
            raise ValueError(f"calib: module {fqn!r} saw no input while running the model on "
                             "the calibration batches")
    return stats


# ---------------------------------------------------------------------------------------
# Quantizing one layer and the model
# ---------------------------------------------------------------------------------------


def _quantize_linear(lin: nn.Linear, config: QuantConfig, stats: _Stats | None) -> QuantLinear:
    w = lin.weight.detach().float()  # (N, K)
    n, k = w.shape
    sdt = config.torch_scale_dtype
    gs = config.group_size or k
    ql = QuantLinear(k, n, bits=config.bits, group_size=config.group_size,
                     symmetric=bool(config.symmetric), bias=lin.bias is not None,
                     input_scale=config.awq, w8a8=config.w8a8, scale_dtype=sdt,
                     compute_dtype=lin.weight.dtype, device=w.device)
    if config.w8a8:
        scale = (w.abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-8).to(sdt)  # (N, 1)
        ql.qweight.copy_(torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8))
        ql.scales.copy_(scale)
    else:
        hessian = stats.hessian() if stats is not None else None
        if config.awq:
            s = awq_search(w, stats.x(), rtn_dequant_fn(config.bits, gs, bool(config.symmetric),
                                                        sdt))  # (K,)
            w = w * s[None, :]
            if hessian is not None:  # inputs become x / s: H' = diag(1/s) H diag(1/s)
                hessian = hessian / s[:, None] / s[None, :]
            ql.input_scale.copy_((1.0 / s).to(ql.input_scale.dtype))
        if config.method == "rtn":
            q, scale, zero = rtn_quantize(w, config.bits, gs, bool(config.symmetric), sdt)
        elif config.method == "hqq":
            q, scale, zero = hqq_quantize(w, config.bits, gs, sdt)
        else:
            q, scale, zero = gptq_quantize(w, hessian, config.bits, gs, bool(config.symmetric),
                                           block_size=config.block_size, damp=config.damp,
                                           act_order=config.act_order, scale_dtype=sdt)
        _fill_packed(ql, q, scale, zero, config)
    if lin.bias is not None:
        ql.bias.copy_(lin.bias.detach())
    ql.quant_config = config.to_dict()  # plain attribute: recorded by save_quantized
    return ql


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _stage_key(fqn: str) -> str:
    """The block a module belongs to: the path up to its first numeric component
    (``layers.3.mlp.up_proj`` -> ``layers.3``); modules outside blocks get their own stage."""
    parts = fqn.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return fqn


def quantize_(model: nn.Module, config: QuantConfig, calib: Any = None,
              filter_fn: FilterFn | None = None, *, batch_size: int = 8) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` with :class:`QuantLinear`, in
    place, at the same paths. Returns ``model``.

    With ``config.include_embeddings`` the ``nn.Embedding`` modules become
    :class:`QuantEmbedding` too: round-to-nearest, or HQQ with ``method="hqq"``; an
    embedding tied to a quantized LM head reads that head's codes, so it has whatever method
    the head had (GPTQ's codes for a GPTQ head, which minimise the head's output error, not
    the rows' own).

    ``calib`` (GPTQ and AWQ): token ids (N, T), run in batches of ``batch_size``, or an
    iterable of batches (tensors, tuples of positional args, or dicts of keyword args).
    Layers are calibrated on the original model's activations in one pass, or block by
    block when ``config.sequential``. ``filter_fn(module, path) -> bool`` narrows the
    selection; with ``include_embeddings`` it is also asked about each ``nn.Embedding``
    (check the module's type before reading Linear-only attributes such as
    ``in_features``). All checks (types, shapes, calibration) run before any module changes.

    Example::

        quantize_(model, QuantConfig(bits=4, group_size=128, method="gptq"), calib=ids)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__}: expected an nn.Module")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config={type(config).__name__}: expected a QuantConfig")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn={filter_fn!r}: expected a callable (module, fqn) -> bool")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    targets = _select_linears(model, config, filter_fn)
    embeddings = _select_embeddings(model, config, filter_fn, targets)
    if not targets and not embeddings:
        raise ValueError(_nothing_matched(config, filter_fn))
    _check_shapes(targets, config)
    _check_calib(calib, config, model)

    if config.needs_calibration and config.sequential:
        stages: dict[str, list[tuple[str, nn.Linear]]] = {}
        for fqn, m in targets:
            stages.setdefault(_stage_key(fqn), []).append((fqn, m))
        groups = list(stages.values())
    else:
        groups = [targets]
    for group in groups:
        stats = (_collect(model, group, calib, config, batch_size)
                 if config.needs_calibration else {})
        for fqn, lin in group:
            _set_module(model, fqn, _quantize_linear(lin, config, stats.get(fqn)))
            stats.pop(fqn, None)  # free this layer's Hessian before the next one
    for fqn, emb, head in embeddings:  # after the Linears: a tied head is quantized by now
        if head is None:
            qe = _quantize_embedding(emb, config)
        else:  # reads the quantized head's packed rows: one table, whatever moves follow
            qe = QuantEmbedding.tied_to(model.get_submodule(head),
                                        compute_dtype=emb.weight.dtype,
                                        padding_idx=emb.padding_idx)
            qe.quant_config = config.to_dict()
        _set_module(model, fqn, qe)
    return model


# ---------------------------------------------------------------------------------------
# Size accounting
# ---------------------------------------------------------------------------------------


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[Any] = set()
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(),
                                        tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared/tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def quant_stats(model: nn.Module) -> dict[str, Any]:
    """Summary for the CLI and demos: quantized module count, their bits per weight
    (metadata included), and the whole model's bytes and bits per parameter."""
    all_q = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    # a tied embedding reads its head's codes: their weights and bytes count once
    qmods: list[Any] = [m for m in all_q
                        if not (isinstance(m, QuantEmbedding) and m.tied_head is not None)]
    qweights = sum(m.qweight.shape[0] * (m.in_features if isinstance(m, QuantLinear)
                                         else m.embedding_dim) for m in qmods)
    qbytes = sum(m.storage_bytes() for m in qmods)
    total = model_size_bytes(model)
    # logical parameter count: a quantized module counts its N*K weights, not its codes
    q_ids = {id(t) for m in qmods for t in (m.qweight, m.scales, m.zeros,
                                             getattr(m, "input_scale", None))
             if t is not None}
    params = qweights + sum(t.numel() for t in _unique_tensors(model) if id(t) not in q_ids)
    return {
        "quantized_modules": len(all_q),
        "quantized_weights": qweights,
        "quantized_bytes": qbytes,
        "bits_per_weight": 8.0 * qbytes / qweights if qweights else None,
        "model_bytes": total,
        "model_params": params,
        "bits_per_param": 8.0 * total / params if params else None,
    }


# ---------------------------------------------------------------------------------------
# Save and load (safetensors + JSON, loaded without materialising fp weights)
# ---------------------------------------------------------------------------------------




def save_quantized(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``quant_config.json`` (format, QuantConfig, per-module specs, tied keys, the
    slimlm ModelConfig when there is one) and ``model.safetensors`` (the whole state dict,
    non-persistent buffers included) to ``folder``. Returns the folder."""
    from safetensors.torch import save_file

    qmods = {fqn: m for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}
    qembs = {fqn: m for fqn, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    paths = {id(m): fqn for fqn, m in model.named_modules()}
    if not qmods and not qembs:
        raise ValueError("save_quantized: model has no QuantLinear or QuantEmbedding module; "
                         "call quantize_ first")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:  # tied weights: safetensors stores one copy, JSON records the alias
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.detach().contiguous()
    for mod_name, mod in model.named_modules():
        for b in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(b)
            if buf is not None:
                key = f"{mod_name}.{b}" if mod_name else b
                tensors[_NONPERSISTENT + key] = buf.detach().contiguous()
    cfg = getattr(model, "cfg", None)
    meta = {
        "format": FORMAT_NAME, "version": 1, "model_class": type(model).__name__,
        "quant_config": next(iter({**qmods, **qembs}.values())).__dict__.get("quant_config"),
        "modules": {fqn: m.spec() for fqn, m in qmods.items()},
        "embeddings": {fqn: {**m.spec(), "tied_to": paths.get(id(m.tied_head))}
                       for fqn, m in qembs.items()},
        "aliases": aliases,
        "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") and
        type(cfg).__name__ == "ModelConfig" else None,
    }
    # weights and config replace the old pair together (never new weights, old config)
    _atomic_write_many({
        folder / WEIGHTS_FILE: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
        folder / CONFIG_FILE: lambda p: Path(p).write_text(json.dumps(meta, indent=2))})
    return folder


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"quant_config.json: unknown dtype {name!r}")
    return dt


def _spec_dtypes(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved module spec with its dtype names as torch dtypes."""
    return {**spec, "scale_dtype": _dtype(spec["scale_dtype"]),
            "compute_dtype": _dtype(spec["compute_dtype"])}


def load_quantized(folder: str | os.PathLike,
                   model: nn.Module | Callable[[], nn.Module] | None = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """Load a model written by :func:`save_quantized` onto ``device``.

    The model skeleton is built on the meta device: from the saved slimlm ``ModelConfig``
    when ``model`` is None, by calling ``model()`` under ``torch.device("meta")`` when it is
    a callable (e.g. ``lambda: LlamaForCausalLM(hf_config)``), or given as a module
    (ideally already on meta). Quantized paths become empty :class:`QuantLinear` modules
    and every tensor is then assigned straight from the safetensors file, so no
    full-precision weight of a quantized layer is ever allocated.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"folder={str(folder)!r}: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                         "written by save_quantized")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_path}: format={meta.get('format')!r}, expected {FORMAT_NAME!r}")
    device = torch.device(device)
    if model is None:
        if meta.get("model_config") is None:
            raise ValueError("load_quantized(model=None): the folder holds no slimlm "
                             "ModelConfig; pass model=<callable building the model>")
        from slimlm.model import ModelConfig, Transformer

        mcfg = ModelConfig.from_dict(meta["model_config"])
        with torch.device("meta"):
            model = Transformer(mcfg)
    elif not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model={type(model).__name__}: expected None, an nn.Module or a "
                            "callable returning one")
        with torch.device("meta"):
            model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model(): returned {type(model).__name__}, expected an nn.Module")
    for fqn, spec in meta["modules"].items():
        spec = _spec_dtypes(spec)
        gs = spec.pop("group_size")
        ql = QuantLinear(group_size=gs, device="meta", **spec)
        if meta.get("quant_config") is not None:
            ql.quant_config = meta["quant_config"]
        _set_module(model, fqn, ql)
    for fqn, spec in meta.get("embeddings", {}).items():
        spec = _spec_dtypes(spec)
        tied_to = spec.pop("tied_to", None)
        if tied_to is not None:  # reads the head's buffers, which load into that module
            qe = QuantEmbedding.tied_to(model.get_submodule(tied_to),
                                        compute_dtype=spec["compute_dtype"],
                                        padding_idx=spec["padding_idx"])
        else:
            qe = QuantEmbedding(device="meta", **spec)
        if meta.get("quant_config") is not None:
            qe.quant_config = meta["quant_config"]
        _set_module(model, fqn, qe)
    tensors = load_file(str(w_path), device=str(device))
    extra = {k[len(_NONPERSISTENT):]: tensors.pop(k) for k in list(tensors)
             if k.startswith(_NONPERSISTENT)}
    aliases: dict[str, str] = meta.get("aliases", {})
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    model.load_state_dict(tensors, strict=True, assign=True)
    for alias, target in aliases.items():  # re-tie: the same Parameter object, not a copy
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        tgt = getattr(model.get_submodule(t_mod) if t_mod else model, t_name)
        setattr(model.get_submodule(a_mod) if a_mod else model, a_name, tgt)
    for key, t in extra.items():
        mod, _, name = key.rpartition(".")
        (model.get_submodule(mod) if mod else model)._buffers[name] = t
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"load_quantized: tensors not in the file stayed on meta: {left[:5]}")
    return model

"""slimlm's reference decoder: a Llama-style transformer, read top to bottom.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA), a SwiGLU MLP
and optionally tied input/output embeddings. Module names follow Hugging Face's
``LlamaForCausalLM`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
``up_proj``, ``down_proj``, ``input_layernorm``, ``post_attention_layernorm``), so every
technique targets the same names in slimlm's model and in Hugging Face's.

Numerically sensitive parts (the norms, RoPE, the softmax and the loss) run in fp32
whatever the compute dtype, as mixed-precision training needs.

Example::

    from slimlm import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny"))
    logits = model(torch.randint(0, 512, (2, 16)))  # (B, T, V)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm._checks import is_real
from slimlm.kernels import gemv as _gemv
from slimlm.quant import linear as _qlin

ATTENTION_IMPLS = ("eager", "sdpa", "flash")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so fp64 reference runs are exact)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ModelConfig:
    """Shape and behaviour of the reference decoder. Validated on construction.

    ``dim`` is the hidden size, ``mlp_dim`` the SwiGLU inner size, ``n_kv_heads`` the
    number of key/value heads (``n_heads`` for plain multi-head attention, 1 for MQA).
    """

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_dim: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "sdpa"
    dropout: float = 0.0
    init_std: float = 0.02
    head_dim_override: int | None = None
    moe: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive integer")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads}: expected a divisor of "
                f"n_heads={self.n_heads} (grouped-query attention shares each K/V head "
                "among n_heads/n_kv_heads query heads)")
        ho = self.head_dim_override
        if ho is not None and (isinstance(ho, bool) or not isinstance(ho, int) or ho <= 0):
            raise ValueError(f"ModelConfig.head_dim_override={ho!r}: expected a positive "
                             "integer or None")
        for name in ("rope_theta", "norm_eps", "init_std", "dropout"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a finite number")
            setattr(self, name, float(value))  # NumPy scalars too; JSON-safe when saved
        if self.head_dim_override is None and self.dim % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.dim={self.dim}: expected a multiple of n_heads={self.n_heads}, "
                "or set head_dim_override")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig head_dim={self.head_dim}: RoPE needs an even head dim")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if self.moe is not None:
            import importlib.util

            if importlib.util.find_spec("slimlm.moe") is None:
                raise ValueError(f"ModelConfig.moe={self.moe!r}: mixture-of-experts layers are "
                                 "not implemented in this version of slimlm; leave moe=None")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("ModelConfig.rope_theta, norm_eps and init_std must be positive, got "
                             f"{self.rope_theta}, {self.norm_eps}, {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    # -- presets and (de)serialisation ---------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see ``PRESETS``), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: unknown preset; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls.from_dict(json.loads(s))

    # -- size and cost ---------------------------------------------------------------------

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        mlp = 3 * d * self.mlp_dim
        per_layer = attn + mlp + 2 * d
        n = self.n_layers * per_layer + d  # final norm
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if include_embedding:
            n += embed
        return n + head

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix product per token (all but the embedding
        lookup and the norms); the LM head counts even when tied."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        return self.n_layers * (attn + 3 * d * self.mlp_dim) + self.vocab_size * d

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token at a sequence length: 2 per matmul weight forward, plus
        causal attention (QK^T and PV over on average seq_len/2 keys); training is 3x
        forward (backward costs twice the forward). Recomputation is not counted (MFU)."""
        fwd = 2 * self.matmul_params() + 2 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return float(3 * fwd if training else fwd)


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: trains on a 2-core CPU in minutes (demo, tests).
    "tiny": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                 max_seq_len=256),
    # ~7M parameters: a better CPU model, or a quick GPU reference.
    "small": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, mlp_dim=768,
                  max_seq_len=512),
    # GPU reference models for quality comparisons (trained by slimlm).
    "llama-50m": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                      mlp_dim=1536, max_seq_len=1024),
    "llama-160m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       mlp_dim=2048, max_seq_len=2048, tie_embeddings=False),
    "llama-400m": dict(vocab_size=32000, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8,
                       mlp_dim=4096, max_seq_len=2048, tie_embeddings=False),
    # Real layer shapes for GPU benchmarks (random init).
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     mlp_dim=8192, max_seq_len=4096, rope_theta=500000.0, tie_embeddings=False),
    "llama-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
}


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = _upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (_upcast(self.weight) * x32).to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer ``positions`` (any shape P): each (*P, head_dim), fp32.
    Half-split layout (as Hugging Face Llama): dims i and i + head_dim/2 rotate together."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))  # (D/2,)
    # fp32 as Hugging Face computes it, so that logits match theirs to rounding.
    angles = positions.float()[..., None] * inv_freq  # (*P, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (*P, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by angles given as cos/sin (B, T, D) or (T, D), in fp32."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    x32 = _upcast(x)
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Plain attention with the N x N score matrix. q (B, H, Tq, D), k/v (B, Hkv, Tk, D).
    Causal masking is aligned bottom-right (query i sees keys up to i + Tk - Tq), as in
    decoding over a cache. ``mask`` (bool, True = keep) broadcasts to (B, H, Tq, Tk)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(groups, dim=1)
    scores = (_upcast(q) @ _upcast(k).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B,H,Tq,Tk)
    tq, tk = q.shape[-2], k.shape[-2]
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # rows with every key masked (left padding) give zeros
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ _upcast(v)).to(q.dtype)  # (B, H, Tq, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's fused attention, with the same bottom-right causal alignment as eager.

    A decode step (one query row, no mask: it sees every key) passes grouped K/V to SDPA
    as they are (``enable_gqa``: the FlashAttention backend reads each KV head for its
    query heads) instead of repeating them into a copy of the whole cache per layer and
    step. Longer blocks keep the repeat: with it, SDPA may pick its cuDNN backend (the
    fastest for training on the H200), which does not take grouped K/V."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.shape[1] != k.shape[1]:
        if tq == 1 and mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(groups, dim=1)
    keep = None
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        keep = mask if keep is None else (keep & mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)


def attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
           mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Dispatch to an attention implementation by name ("eager", "sdpa", "flash")."""
    if impl == "sdpa":
        return sdpa_attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)
    if impl == "eager":
        return eager_attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)
    from slimlm import attention as _attention  # the flash-attention issue provides this

    return _attention.attend_flash(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. Optionally reads/extends a KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        kind = _decode_kind(cache, x, self.q_proj, self.k_proj, self.v_proj)
        if kind == "dense":
            # decode: q, k and v from one GEMV launch (slimlm.kernels.gemv)
            q, k, v = _gemv.grouped_linear(x, [self.q_proj.weight, self.k_proj.weight,
                                               self.v_proj.weight])
        elif kind == "quant":  # the same for quantized layers (slimlm.kernels.quant_gemv)
            q, k, v = _qlin.fused_linear(x, [self.q_proj, self.k_proj, self.v_proj])
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,T,D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # The cache stores this step's keys/values and hands back what to attend over;
            # a compressing cache may return fewer keys than positions seen, or attend itself.
            custom = getattr(cache, "attend", None)
            if custom is not None:
                out = custom(self.layer_idx, q, k, v, mask=mask)
            else:
                k, v = cache.append(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
                out = attend(self.cfg.attention, q, k, v, causal=True, mask=mask)
        else:
            p = self.cfg.dropout if self.training else 0.0
            out = attend(self.cfg.attention, q, k, v, causal=True, mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return _decode_linear(cache, out, self.o_proj)


def _decode_kind(cache: Any, x: torch.Tensor, *modules: nn.Module) -> str | None:
    """How a decode step (``cache.fused_linears``: set by generate's static step) runs
    ``modules`` on x: "dense" (plain bf16/fp16 nn.Linear: slimlm.kernels.gemv), "quant"
    (QuantLinear: slimlm.kernels.quant_gemv), or None (each module's own forward)."""
    if not getattr(cache, "fused_linears", False):
        return None
    if _gemv.plain_linears(x, *modules):
        return "dense"
    if _qlin.fused_decode_ok(x, *modules):
        return "quant"
    return None


def _decode_linear(cache: Any, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module(x)``, by a fused decode GEMV where :func:`_decode_kind` allows."""
    kind = _decode_kind(cache, x, module)
    if kind == "dense":
        return _gemv.grouped_linear(x, [module.weight])[0]
    if kind == "quant":
        return _qlin.fused_linear(x, [module])[0]
    return module(x)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = _make_mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        h = self.post_attention_layernorm(x)
        mlp = self.mlp
        if type(mlp) is MLP:
            kind = _decode_kind(cache, h, mlp.gate_proj, mlp.up_proj)
            if kind is not None:
                # decode: gate, up and the SwiGLU product in one GEMV launch, then down
                if kind == "dense":
                    g = _gemv.swiglu_linear(h, mlp.gate_proj.weight, mlp.up_proj.weight)
                else:
                    g = _qlin.fused_linear(h, [mlp.gate_proj, mlp.up_proj], swiglu=True)
                return x + self.dropout(_decode_linear(cache, g, mlp.down_proj))
        return x + self.dropout(mlp(h))


def _make_mlp(cfg: ModelConfig) -> nn.Module:
    if cfg.moe:
        from slimlm import moe  # the mixture-of-experts technique provides this

        return moe.MoEMLP(cfg)
    return MLP(cfg)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """The decoder: embed, n_layers blocks, final norm, LM head.

    ``forward(idx)`` returns logits (B, T, V); with ``targets`` it returns
    ``(logits, loss)`` where the loss is the mean next-token cross-entropy in fp32 over
    targets that are not ``ignore_index`` (-100). ``positions`` (B, T) overrides the
    default positions (left-padded batches); ``mask`` (bool, True = attend) of shape
    broadcastable to (B, 1, T, Tk) masks keys (padding).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2 n_layers)
        (GPT-2's residual scaling) so that the residual stream's variance stays put."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: Any = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> Any:
        B, T = idx.shape
        if positions is None:
            start = cache.seq_len if cache is not None else 0
            if start + T > self.cfg.max_seq_len and cache is None:
                raise ValueError(f"input length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # (.., T, D)
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(_upcast(logits).view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

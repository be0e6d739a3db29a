"""``QuantEmbedding``: a drop-in replacement for ``nn.Embedding`` holding packed integer rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm._checks import is_bool, is_int
from slimlm.kernels.quant_matmul import packed_cols, unpack_bits

__all__ = ["QuantEmbedding"]


class QuantEmbedding(nn.Module):
    """A token embedding table stored as packed 2/3/4/8-bit codes with a scale (and a zero
    point) per group of ``group_size`` consecutive features of a row: row ``v`` is
    ``(q[v] - zero) * scale``. A lookup gathers the packed rows of the ids it is given and
    dequantizes only those, so the table stays packed in memory (a vocabulary of 128k x
    4096 is 1 GiB in bf16, 0.27 GiB at int4 with group 128).

    Buffers ``qweight`` (V, D*bits/8) uint8, ``scales`` (V, D/group_size) and ``zeros``
    (absent when symmetric) use the layout of :class:`~slimlm.quant.QuantLinear`. An
    embedding tied to a quantized LM head (:meth:`tied_to`) has no buffers of its own: it
    reads the head's, whatever device or dtype moves the model goes through (buffers, unlike
    tied parameters, would be copied apart by a move), and the state dict holds them once.
    The output is in ``compute_dtype`` (the original table's dtype). Inference only: the
    table has no gradient. ``padding_idx`` is kept for ``repr`` and export only (as in
    ``nn.Embedding`` it affects training, which a packed table does not do).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int = 4,
                 group_size: int | None = None, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings),
                            ("embedding_dim", embedding_dim)):
            if not is_int(value) or value < 1:
                raise ValueError(f"QuantEmbedding: {name}={value!r}: expected a positive "
                                 "integer")
        if not is_int(bits) or bits not in (2, 3, 4, 8):
            raise ValueError(f"QuantEmbedding: bits={bits!r}: expected one of (2, 3, 4, 8)")
        if not is_bool(symmetric):
            raise ValueError(f"QuantEmbedding: symmetric={symmetric!r}: expected True or False")
        gs = embedding_dim if group_size is None else group_size
        if not is_int(gs) or gs < 1 or embedding_dim % gs:
            raise ValueError(f"QuantEmbedding: group_size={group_size!r}: expected a divisor "
                             f"of embedding_dim={embedding_dim}, or None (one group per row)")
        if (embedding_dim * bits) % 8:
            raise ValueError(f"QuantEmbedding: embedding_dim={embedding_dim} at bits={bits} "
                             "does not pack into whole bytes")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.bits, self.group_size, self.symmetric = int(bits), int(gs), bool(symmetric)
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        v, d = self.num_embeddings, self.embedding_dim
        self.register_buffer("qweight", torch.empty(v, packed_cols(d, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(v, d // gs, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else torch.empty(
            v, d // gs, dtype=scale_dtype, device=device))

    @classmethod
    def tied_to(cls, head: nn.Module, *, compute_dtype: torch.dtype,
                padding_idx: int | None = None) -> QuantEmbedding:
        """An embedding that reads the packed rows of ``head``, a weight-only
        :class:`~slimlm.quant.QuantLinear` (V, D) (the tied LM head), instead of its own."""
        from slimlm.quant.linear import QuantLinear

        if not isinstance(head, QuantLinear) or head.w8a8 or head.input_scale is not None:
            raise ValueError(f"QuantEmbedding.tied_to: head={type(head).__name__}"
                             f"{'(w8a8)' if getattr(head, 'w8a8', False) else ''}: expected a "
                             "weight-only QuantLinear without AWQ input scales")
        emb = cls(head.out_features, head.in_features, bits=head.bits,
                  group_size=head.group_size, symmetric=head.zeros is None,
                  scale_dtype=head.scales.dtype, compute_dtype=compute_dtype,
                  padding_idx=padding_idx, device="meta")
        for name in ("qweight", "scales", "zeros"):
            del emb._buffers[name]
        object.__setattr__(emb, "_tied_head", head)  # a reference, not a submodule
        return emb

    @property
    def tied_head(self) -> nn.Module | None:
        """The QuantLinear whose packed rows this embedding reads, or None."""
        return self.__dict__.get("_tied_head")

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name in ("qweight", "scales", "zeros"):
            head = self.__dict__.get("_tied_head")
            if head is not None:
                return getattr(head, name)
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Device moves apply to every buffer; ``.to(dtype)`` / ``.half()`` change the output
        dtype but not the stored scales and zero points (a cast would change the rows)."""
        keep = {n: t for n in ("scales", "zeros") if (t := self._buffers.get(n)) is not None}
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        super()._apply(fn, recurse)
        for name, t in keep.items():
            dev = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
            self._buffers[name] = t.to(dev)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def spec(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this module's buffers."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "padding_idx": self.padding_idx}

    def storage_owner(self) -> nn.Module:
        """The module holding the packed rows: the tied head, or this embedding."""
        return self.tied_head if self.tied_head is not None else self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"QuantEmbedding: ids.dtype={ids.dtype}: expected integer token ids")
        flat = ids.reshape(-1)
        rows = F.embedding(flat, self.qweight)  # (R, D*bits/8) packed
        q = unpack_bits(rows, self.bits, self.embedding_dim).float()  # (R, D)
        r, ng, gs = flat.numel(), self.embedding_dim // self.group_size, self.group_size
        s = F.embedding(flat, self.scales).float().reshape(r, ng, 1)
        z = (F.embedding(flat, self.zeros).float().reshape(r, ng, 1) if self.zeros is not None
             else float(1 << (self.bits - 1)))
        w = ((q.reshape(r, ng, gs) - z) * s).reshape(*ids.shape, self.embedding_dim)
        return w.to(self.compute_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table (V, D) in ``dtype``."""
        return self(torch.arange(self.num_embeddings, device=self.qweight.device)).to(dtype)

    def storage_bytes(self) -> int:
        """Bytes of the codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros)
                   if t is not None)

    def bits_per_weight(self) -> float:
        """Storage bits per table entry, scales and zero points included."""
        return 8.0 * self.storage_bytes() / (self.num_embeddings * self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", tied to the LM head's codes" if self.tied_head is not None else ""))

"""Does torch.compile compute torch._scaled_mm (and slimlm's Float8Linear) as eager does?
Prints, per variant, the relative difference of the compiled output from eager's and its
largest magnitude (0 = the all-zero outputs seen on the H200 with torch 2.11).

    python scripts/fp8_compile_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from slimlm import precision  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    a = torch.randn(256, 512, device=dev).to(torch.float8_e4m3fn)
    b_t = torch.randn(768, 512, device=dev).to(torch.float8_e4m3fn)
    sa, sb = torch.tensor(0.5, device=dev), torch.tensor(2.0, device=dev)

    def raw(a, b_t, sa, sb):
        return torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    ref = raw(a, b_t, sa, sb)
    for name, kw in (("inductor", {}), ("aot_eager", {"backend": "aot_eager"})):
        torch.compiler.reset()
        got = torch.compile(raw, **kw)(a, b_t, sa, sb)
        print(f"raw _scaled_mm [{name}]: rel {rel(got, ref):.3g}, max {got.abs().max():.3g}")

    def scales_inside(x, w):  # scales computed in the graph, as Float8Linear does
        xq, xs = precision.quantize_fp8(x, torch.float8_e4m3fn)
        wq, ws = precision.quantize_fp8(w, torch.float8_e4m3fn)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)

    x = torch.randn(256, 512, device=dev, dtype=torch.bfloat16)
    w = torch.randn(768, 512, device=dev, dtype=torch.bfloat16)
    ref = scales_inside(x, w)
    torch.compiler.reset()
    got = torch.compile(scales_inside)(x, w)
    print(f"quantize + _scaled_mm [inductor]: rel {rel(got, ref):.3g}, max {got.abs().max():.3g}")

    for grad in (False, True):
        torch.manual_seed(0)
        lin = nn.Linear(512, 768, bias=False, device=dev)
        precision.Float8Linear.from_linear(lin, fallback="never")
        xi = torch.randn(256, 512, device=dev, requires_grad=grad)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = lin(xi)
            torch.compiler.reset()
            got = torch.compile(lin)(xi)
        print(f"Float8Linear compiled, x.requires_grad={grad}: rel {rel(got, ref):.3g}, "
              f"max {got.abs().max():.3g}")
    torch.compiler.reset()


if __name__ == "__main__":
    main()

"""Max errors of every available SupCon backend against the float64 reference, per dtype,
beside eager PyTorch's own error at the same precision (the tolerance rule's yardstick).

    python scripts/supcon_errors.py [--n 4096] [--d 128] [--beta 1.0]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import anchor_kernels as ak  # noqa: E402


def run(backend, f, y, dtype, weights, **kw):
    x = f.detach().to(dtype).requires_grad_()
    loss = ak.supcon_loss(x, y, reduction="none", backend=backend, **kw)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach().double(), x.grad.double()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda", "cpu"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    f = torch.randn(args.n, args.d, device=device, dtype=torch.float64)
    y = torch.randint(0, 10, (args.n,), device=device)
    w = torch.rand(args.n, device=device, dtype=torch.float64) + 0.5
    kw = dict(temperature=0.1, hard_positive_beta=args.beta)
    ref_loss, ref_grad = run("eager", f, y, torch.float64, w, **kw)
    print(f"{device}: N={args.n} D={args.d} beta={args.beta}, errors vs float64 reference "
          f"(grad: max abs / max |ref grad|)")
    print(f"{'dtype':>9} {'backend':>8} {'loss max abs':>13} {'grad max rel':>13}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for backend in ["eager"] + args.backends:
            try:
                loss, grad = run(backend, f, y, dtype, w, **kw)
            except ValueError as exc:  # backend cannot run here
                print(f"{str(dtype)[6:]:>9} {backend:>8}  skipped: {str(exc)[:70]}")
                continue
            le = (loss - ref_loss).abs().max().item()
            ge = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
            print(f"{str(dtype)[6:]:>9} {backend:>8} {le:13.3e} {ge:13.3e}")


if __name__ == "__main__":
    main()

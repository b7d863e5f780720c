"""DDP training with the hard-mined SupCon loss over the global batch.

    torchrun --nproc_per_node=2 examples/ddp_supcon.py                # CPU, gloo
    torchrun --nproc_per_node=8 examples/ddp_supcon.py --steps 200    # one GPU per process, nccl

A small MLP embeds two noisy "views" of points drawn around class centres. Each rank draws
its own batch (rank r gets batch + r samples: local batches need not be equal); the loss sees
every rank's embeddings as contrast rows and DDP averages the gradients. At step 0 rank 0
also computes the single-process loss of the gathered batch, which the mean of the ranks'
losses equals.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import anchor_kernels
except ModuleNotFoundError:  # run from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import anchor_kernels
from anchor_kernels.distributed import DistributedHardMinedSupConLoss, all_gather_with_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank (rank r: + r)")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    criterion = DistributedHardMinedSupConLoss(temperature=0.1, hard_positive_beta=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    centres = torch.randn(args.classes, 32, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    b = args.batch + rank
    for step in range(args.steps):
        labels = torch.randint(0, args.classes, (b,), generator=gen)
        views = centres[labels][:, None] + 0.7 * torch.randn(b, 2, 32, generator=gen)
        labels, views = labels.to(device), views.to(device)

        features = model(views)  # (B_r, 2, 16)
        loss = criterion(features, labels)  # this rank's share, scaled for DDP's averaging
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        logged = loss.detach().clone()
        dist.all_reduce(logged)  # SUM (gloo has no AVG); the mean over ranks is the global loss
        logged /= world
        if step == 0:
            with torch.no_grad():  # the whole batch in one process, for comparison
                all_features = all_gather_with_grad(features.detach())
                all_labels = all_gather_with_grad(labels)
                single = anchor_kernels.supcon_loss(all_features, all_labels, temperature=0.1,
                                                    hard_positive_beta=1.0)
            if rank == 0:
                print(f"world {world}, global batch {all_labels.numel()}: distributed loss "
                      f"{logged.item():.6f}, single-process loss {single.item():.6f}")
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {logged.item():.4f}")

    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A tiny DDP regression for TorchrunJob examples and tests (CPU, gloo).

Rank 0 saves a checkpoint to ``$CHECKPOINT_DIR`` after every step and every run resumes from
it, so a suspended and resumed job carries on where it stopped. At the end rank 0 writes
``done.json``: the final step and loss, the first loss, and the steps each run started from.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    dist.init_process_group(os.environ.get("TORCHRUN_BACKEND", "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(os.environ.get("CHECKPOINT_DIR", "."))
    ckpt = folder / "ckpt.pt"
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    state = {"step": 0, "first_loss": None, "starts": []}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    state["starts"].append(state["step"])
    print(f"rank {rank}/{world} starting at step {state['step']}", flush=True)
    generator = torch.Generator().manual_seed(1234 + rank)
    true_w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    loss = torch.tensor(0.0)
    while state["step"] < args.steps:
        x = torch.randn(64, 4, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), x @ true_w)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] += 1
        if state["first_loss"] is None:
            state["first_loss"] = loss.item()
        if rank == 0:
            saved = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**saved, "state": state}, folder / "ckpt.tmp")
            os.replace(folder / "ckpt.tmp", ckpt)  # never a half-written checkpoint
            print(f"step {state['step']} loss {loss.item():.4f}", flush=True)
        time.sleep(args.step_seconds)
    dist.barrier()
    if rank == 0:
        done = {"step": state["step"], "loss": loss.item(), "world": world, **state}
        (folder / "done.json").write_text(json.dumps(done))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

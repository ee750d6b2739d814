"""Data-parallel training across processes started by torchrun: the process group and each process's device.

Under `torchrun --nproc_per_node=N` the environment carries WORLD_SIZE, RANK and LOCAL_RANK; without it
(WORLD_SIZE unset or 1) a `Dist` is a single process and every collective is the identity.
"""
import os

import torch
import torch.distributed as dist

from .runtime import UsageError, resolve_device


class Dist:
    """The process group (under torchrun) and this process's device.

    device: --device (None = cuda if available, else cpu). Under torchrun each process takes the GPU of its
    local rank (so "cuda:N" is refused there) and the group uses NCCL; on the CPU it uses gloo.
    """

    def __init__(self, device=None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = resolve_device(device)
        if self.enabled:
            use_cuda = self.device.type == "cuda"
            if use_cuda:
                if self.device.index is not None:
                    raise UsageError(f"--device {device}: under torchrun every process uses the GPU of its local "
                                     "rank; pass --device cuda")
                if self.local_rank >= torch.cuda.device_count():
                    raise UsageError(f"local rank {self.local_rank} has no GPU: this node has "
                                     f"{torch.cuda.device_count()}; start at most that many processes per node")
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if not use_cuda:
                # share the cores between the processes on this node
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        elif self.device.type == "cuda":
            # custom kernels launch on the current device's stream: make it the training device
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)

    @classmethod
    def single(cls):
        d = cls.__new__(cls)
        d.world, d.rank, d.local_rank, d.enabled, d.device = 1, 0, 0, False, torch.device("cpu")
        return d

    @property
    def main(self):
        return self.rank == 0

    def all_reduce(self, t, op=None):
        if self.enabled:
            t = t.to(self.device)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
            t = t.cpu()
        return t

    def any(self, flag):
        return bool(self.all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX if self.enabled else None)[0] > 0)

    def gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def param_divergence(model, ddp):
    """Largest |parameter - rank 0's parameter| over all ranks (0 when the replicas are in sync)."""
    worst = 0.0
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        worst = max(worst, (p.detach() - ref).abs().max().item() if p.numel() else 0.0)
    return float(ddp.all_reduce(torch.tensor([worst]), dist.ReduceOp.MAX)[0])


"""Point-to-point ring exchange and all-to-all over torch.distributed.

NCCL runs its transfers on its own stream, ordered after the work queued on
the current stream when the call is made, and `wait()` makes the current
stream wait for them: launching the next block's transfer before the current
block's attention is what overlaps communication with compute. Gloo carries
CPU tensors; CUDA tensors on a gloo group (a one-GPU run with several
processes) are staged through host memory.
"""
from typing import List, Sequence

import torch
import torch.distributed as dist


def _stages_through_host(group, t: torch.Tensor) -> bool:
    return t.is_cuda and dist.get_backend(group) == dist.Backend.GLOO


class _Pending:
    def __init__(self, works, received, device_targets, sent):
        self._works, self._received, self._targets = works, received, device_targets
        # The sent tensors stay referenced until wait(): their memory must not be
        # reused while the transfer may still read it.
        self._sent = sent

    def wait(self) -> List[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._sent = None
        if self._targets is None:
            return self._received
        return [r.to(d, non_blocking=False) for r, d in zip(self._received, self._targets)]


class Ring:
    """Rank r sends to r+1 and receives from r-1 (ranks within `group`)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group else (self.rank + 1) % self.world
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group else (self.rank - 1) % self.world

    def exchange(self, send: Sequence[torch.Tensor], recv_shapes=None) -> _Pending:
        """Starts sending `send` to the next rank and receiving tensors of
        `recv_shapes` (default: the same shapes) from the previous one."""
        shapes = recv_shapes or [t.shape for t in send]
        staged = any(_stages_through_host(self.group, t) for t in send)
        targets = [t.device for t in send] if staged else None
        send = [(t.cpu() if staged else t).contiguous() for t in send]
        recv = [torch.empty(s, dtype=t.dtype, device=t.device) for s, t in zip(shapes, send)]
        ops = []
        # One batch: NCCL runs it as one group (no send/recv ordering deadlock);
        # gloo matches each send to the receive of the same tag.
        for i, (s, r) in enumerate(zip(send, recv)):
            ops.append(dist.P2POp(dist.isend, s, self._next, self.group, tag=i))
            ops.append(dist.P2POp(dist.irecv, r, self._prev, self.group, tag=i))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(works, recv, targets, send)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Splits x into N parts along scatter_dim, sends part i to rank i, and
    concatenates the parts received along gather_dim (rank order)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    staged = _stages_through_host(group, x)
    src = x.cpu() if staged else x
    parts = [p.contiguous() for p in torch.tensor_split(src, world, dim=scatter_dim)]
    recv = [torch.empty_like(parts[0]) for _ in range(world)]
    if dist.get_backend(group) == dist.Backend.NCCL:
        dist.all_to_all(recv, parts, group=group)
    else:
        # Point-to-point pairs: gloo has no alltoall in some torch versions (2.11).
        rank = dist.get_rank(group)
        peer = (lambda i: dist.get_global_rank(group, i)) if group is not None else (lambda i: i)
        ops = []
        for i in range(world):
            if i == rank:
                recv[i] = parts[i]
                continue
            ops.append(dist.P2POp(dist.isend, parts[i], peer(i), group, tag=rank))
            ops.append(dist.P2POp(dist.irecv, recv[i], peer(i), group, tag=i))
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    out = torch.cat(recv, dim=gather_dim)
    return out.to(x.device) if staged else out


def all_gather_ints(values: Sequence[int], group=None) -> List[List[int]]:
    """Every rank's list of ints (a host sync; done once per call, never per block)."""
    world = dist.get_world_size(group)
    t = torch.tensor(list(values), dtype=torch.int64)
    if dist.get_backend(group) == dist.Backend.NCCL:
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]

"""Data-parallel training on ``torch.distributed``: one process per device, started by ``torchrun``.

The training loop (:func:`pvae.inference.train`) and the step (:class:`pvae.inference.SVIStep`) read the
process group from here; outside one (a plain ``python`` run) every function answers as for one process,
so the same code serves both.

How a step is shared (the batch size stays the *global* batch):

- every process iterates the same loader, seeded alike, so each epoch's permutation and each global batch
  are the same on every rank (dynamic binarization included: the loader draws it for the whole global
  batch); rank r takes its slice :func:`shard` of every global batch;
- rank r scores its slice x_r (b_r of the batch's B points) with the family's data plate at
  ``num_data = W · b_r`` (W processes), so every site is scaled by W: the average over ranks of their
  losses is the global batch's loss Σ_i ℓ_i, exactly the one-process loss, and DistributedDataParallel's
  gradient average is its gradient;
- everything drawn inside a step (latents, corruption noise, diffusion timesteps) comes from per-rank
  streams seeded by :func:`rank_seed` (the seed, the rank and the epoch), so a resumed run draws what the
  uninterrupted one would have.

Launch: ``torchrun --standalone --nproc-per-node=N -m pvae train …`` (one machine), or on each of M machines
``torchrun --nnodes=M --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 -m pvae train …``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_module",
    "broadcast_tensors",
    "from_main_process",
    "is_main_process",
    "launched",
    "rank",
    "rank_seed",
    "setup",
    "shard",
    "teardown",
    "world_size",
]

# torchrun's environment: a process it started has all of these.
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a rank and a world)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def world_size() -> int:
    """Number of processes in the default group (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 outside one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes files, pictures and progress bars."""
    return rank() == 0


def setup(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group that ``torchrun`` describes, and return this process's device.

    Outside torchrun nothing is set up and ``device`` is resolved as usual. Under torchrun: ``gloo`` on
    CPUs, ``nccl`` on CUDA; with CUDA, each process uses ``cuda:LOCAL_RANK`` (so ``device`` may only say
    ``"cuda"``, ``"cpu"`` or nothing). Idempotent.

    :raises ValueError: for a device naming a GPU index under torchrun, or a local rank past the last GPU.
    """
    from pvae.utils import resolve_device

    if not launched():
        return resolve_device(device)
    requested = torch.device(device) if device is not None else None
    if requested is not None and requested.type == "cuda" and requested.index is not None:
        raise ValueError(
            f"device {device!r}: under torchrun each process uses cuda:LOCAL_RANK; pass 'cuda' (or 'cpu')"
        )
    use_cuda = torch.cuda.is_available() if requested is None else requested.type == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): start at "
                "most that many processes per node (torchrun --nproc-per-node)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    else:
        resolved = resolve_device("cpu" if requested is None else requested)
    if not dist.is_initialized():
        options = {"device_id": resolved} if use_cuda else {}
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s), **options
        )
    return resolved


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for rank ``rank``'s draws in epoch ``epoch`` of a run seeded with ``seed``: a hash of the
    three, so streams of different ranks and epochs are unrelated and any of them can be recreated."""
    digest = hashlib.blake2b(f"pvae:{seed}:{rank}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**32  # NumPy (seeded by Pyro too) takes 32 bits


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
    """Rank ``rank``'s contiguous share of a global batch ``x`` split over ``world`` processes.

    Shares differ by at most one point (``torch.tensor_split``); a batch with fewer points than processes
    (only a data set's last batch can be) is skipped by every rank: ``None``.
    """
    if x.shape[0] < world:
        return None
    return torch.tensor_split(x, world)[rank]


def all_reduce_sum(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks of a vector of numbers (float64 on ``device``), or the vector itself alone."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _flat_groups(tensors: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


@torch.no_grad()
def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its average over ranks, one collective per device and dtype.

    Where DistributedDataParallel cannot wrap the step (Pyro params outside any module, the recorded
    graphs of the trace/compile engines, which return gradients rather than accumulate them in a module's
    backward pass) this is the same averaging, done with the gradients flattened into one buffer as DDP's
    buckets are. A parameter without a gradient contributes zeros.
    """
    world = world_size()
    if world == 1:
        return
    for group in _flat_groups(params).values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for param, grad in zip(group, grads):
            size = grad.numel()
            param.grad = flat[offset : offset + size].view_as(param).clone()
            offset += size


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (R_r, ...), concatenated in rank order (ranks may hold different
    numbers of rows); the tensor itself in one process."""
    world = world_size()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite the tensors on every rank by rank 0's values, in place."""
    if world_size() == 1:
        return
    for group in _flat_groups(tensors).values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for tensor in group:
            tensor.detach().copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the start of data-parallel training)."""
    broadcast_tensors([t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)])


class _RemoteFailure(Exception):
    pass


def _rebuilt(kind: type, message: str) -> Exception:
    """An exception of ``kind`` (or of its nearest plain base, when its constructor wants more than a
    message, e.g. a CheckpointError) carrying ``message``."""
    for candidate in (kind, ValueError, OSError, FloatingPointError, RuntimeError):
        if issubclass(kind, candidate):
            try:
                return candidate(message)
            except Exception:
                continue
    return _RemoteFailure(message)


def from_main_process(compute: Callable[[], object]):
    """``compute()`` on rank 0, its result sent to every rank (e.g. a checkpoint only rank 0's machine
    holds); an exception raised there is raised on every rank with the same type and message.

    The result travels as a pickle between the processes of one job (``broadcast_object_list``): only
    values rank 0 produced itself, from files it has validated.
    """
    if world_size() == 1:
        return compute()
    box: list = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as error:
            box[0] = ("error", type(error), str(error))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        kind, message = box[0][1], box[0][2]
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = _RemoteFailure
        raise _rebuilt(kind, message)
    return box[0][1]

"""One process of a data-parallel test run, started by torchrun (tests/inference/test_distributed.py).

``python distributed_worker.py SCENARIO OUT [options]`` under ``torchrun --nproc-per-node=W``; each rank
writes ``OUT/rank{R}.pt`` (its parameters, the history, the step engine's counters) for the test to
compare. Scenarios:

- ``train``: a family (``--family vae|ddpm``) trained by :func:`pvae.inference.train` on small synthetic
  data, checkpoint in ``OUT/checkpoint.pt`` (``--resume`` continues it); ``--kill-at K`` makes rank 1 kill
  itself (SIGKILL) in its K-th step, ``--nan-at K`` makes rank 1's parameters NaN after its K-th step;
- ``free``: a pair whose guide has Pyro params outside any module, started from different values on each
  rank, trained by :class:`pvae.inference.SVIStep` (``--engine``).
"""

from __future__ import annotations

import argparse
import os
import signal

import pyro
import pyro.distributions as dist
import torch

import pvae
from pvae.inference import SVIStep, distributed, train
from pvae.models.diffusion import DDPM
from pvae.models.vae import VAE


def _family(name: str, time_sampling: str):
    if name == "vae":
        return VAE(x_dim=64, z_dim=4, hidden_dim=32)
    return DDPM(
        data_shape=(2,), timesteps=20, hidden_dim=32, num_blocks=1, ema_decay=0.9, time_sampling=time_sampling
    )


def _data(name: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    if name == "vae":
        return (torch.rand(n, 64, generator=generator) < 0.3).float()
    angle = torch.rand(n, generator=generator) * 3.1416
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * torch.randn(n, 2, generator=generator)


def _train(args, rank: int) -> dict:
    pvae.utils.seed_everything(0)
    family = _family(args.family, args.time_sampling)
    steps = [0]

    def hook():
        steps[0] += 1
        if rank == 1 and steps[0] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and steps[0] == args.nan_at:
            with torch.no_grad():
                next(family.parameters()).fill_(float("nan"))
        if args.family == "ddpm":
            type(family).after_step(family)  # the EMA

    family.after_step = hook
    data = _data(args.family, args.num_data)
    train_loader = pvae.data.BatchLoader(data[:-100], batch_size=args.batch_size, seed=0)
    test_loader = pvae.data.BatchLoader(data[-100:], batch_size=50, shuffle=False)
    objective = "elbo" if args.family == "vae" else "meanfield"
    history = train(
        family,
        train_loader,
        test_loader,
        epochs=args.epochs,
        objective=objective,
        lr=3e-3,
        seed=7,
        engine=args.engine,
        checkpoint=os.path.join(args.out, "checkpoint.pt"),
        resume=args.resume,
        overwrite=not args.resume,
        progress=False,
    )
    return {"state": family.state_dict(), "history": history.to_dict()}


def _free(args, rank: int) -> dict:
    pyro.clear_param_store()
    torch.manual_seed(100 + rank)  # each rank starts its Pyro params elsewhere: rank 0's must win
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(5)) + 1.0

    def model(x, num_data=None):
        with pvae.data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, num_data=None):
        weight = pyro.param("weight", torch.randn(3))
        log_scale = pyro.param("log_scale", torch.randn(3))
        with pvae.data_plate(x, num_data):
            pyro.sample("z", dist.Normal(weight * x, log_scale.exp()).to_event(1))

    torch.manual_seed(distributed.rank_seed(0, rank, 0))
    step = SVIStep(model, guide, pyro.infer.Trace_ELBO(), lr=0.05, engine=args.engine)
    world = distributed.world_size()
    for _ in range(30):
        share = distributed.shard(x, rank, world)
        step(share, num_data=world * share.shape[0])
    store = pyro.get_param_store()
    state = {name: store[name].detach().clone() for name in ("weight", "log_scale")}
    return {"state": state, "counts": dict(step.counts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("train", "free"))
    parser.add_argument("out")
    parser.add_argument("--family", default="vae", choices=("vae", "ddpm"))
    parser.add_argument("--engine", default="eager")
    parser.add_argument("--time-sampling", default="per_datum")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-data", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--nan-at", type=int, default=0)
    args = parser.parse_args()
    distributed.setup("cpu")
    rank = distributed.rank()
    try:
        result = _train(args, rank) if args.scenario == "train" else _free(args, rank)
        result["world_size"] = distributed.world_size()
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()

"""Example: a model/guide pair of your own, registered with pvae and run through its command line.

Coins: each datum is ``flips`` tosses of one coin whose bias θ ~ Beta(2, 3) (the prior); the guide is
an amortized Beta(a(x), b(x)) from the fraction of heads. The exact posterior is Beta(2 + heads, 3 + tails)
and log p(x) is a ratio of Beta functions, so the fitted guide can be judged against the truth.

Run: ``python examples/own_family.py [--flips 16] [--epochs 15] [--out runs/own_family]``: it trains,
saves, loads, evaluates and samples through ``pvae train/evaluate/sample`` with no change to pvae.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

import pvae
from pvae import cli
from pvae.checks import check_int
from pvae.cli import FamilyCommands, RunData, register_commands
from pvae.cli.common import bounded_int, positive_int

PRIOR = (2.0, 3.0)  # Beta(a, b) on the coin's bias


def draw_bias(count: int, generator=None, device=None) -> torch.Tensor:
    """θ ~ Beta(2, 3) from ``generator``: the 2nd smallest of 4 uniforms (an order statistic of uniforms is
    Beta-distributed; torch's Beta sampler takes no generator)."""
    uniforms = torch.rand(count, 4, generator=generator, device=device)
    return uniforms.sort(-1).values[:, 1]


@dataclass
class CoinsConfig:  # the single list of constructor arguments
    flips: int = 16
    name: str | None = None


@pvae.register_family("coins")  # checkpoints name it "coins", never an import path
class Coins(pvae.Family):
    config_class = CoinsConfig

    def __init__(self, flips: int = 16, name: str | None = None):
        super().__init__(name)
        self.config = CoinsConfig(flips=check_int("flips", flips, 1, 1024), name=self.name)
        self.encoder = torch.nn.Linear(1, 2)  # fraction of heads → Beta concentrations (softplus)

    def model(self, x=None, num_data=None):  # x=None: the prior predictive
        pyro.module(self.name, self)
        with pvae.data_plate(x, num_data, device=self.device):
            theta = pyro.sample("theta", dist.Beta(*PRIOR))
            probs = theta.unsqueeze(-1).expand(*theta.shape, self.config.flips)
            pyro.sample("x", dist.Bernoulli(probs).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        pyro.module(self.name, self)
        with pvae.data_plate(x, num_data):
            a, b = (torch.nn.functional.softplus(self.encoder(x.mean(-1, keepdim=True))) + 1e-3).unbind(-1)
            pyro.sample("theta", dist.Beta(a, b))

    def log_marginal(self, x):
        """Exact log p(x) = log B(a + heads, b + tails) − log B(a, b), per datum."""
        heads, (a, b) = x.sum(-1), PRIOR

        def log_beta(p, q):
            return torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)

        return log_beta(a + heads, b + self.config.flips - heads) - log_beta(x.new_tensor(a), x.new_tensor(b))

    @torch.no_grad()
    def sample(self, n, *, generator=None):
        theta = draw_bias(n, generator, self.device)  # the bias of each coin
        uniform = torch.rand(n, self.config.flips, generator=generator, device=self.device)
        return (uniform < theta.unsqueeze(-1)).float()


# ---- its command-line face, declared once -------------------------------------------------------------
def draw_coins(count: int, flips: int, seed: int) -> torch.Tensor:
    """``count`` data of ``flips`` tosses each, from the model, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    theta = draw_bias(count, generator)
    return (torch.rand(count, flips, generator=generator) < theta.unsqueeze(-1)).float()


def add_arguments(parser):
    parser.add_argument("--flips", type=bounded_int(1, 1024), default=16, help="tosses per coin (16)")
    parser.add_argument("--num-train", type=positive_int, default=512, help="coins to train on (512)")


def data(args, device):
    from pvae.data import BatchLoader

    train_x = draw_coins(args.num_train, args.flips, args.seed).to(device)
    test_x = draw_coins(200, args.flips, args.seed + 1).to(device)
    train = BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed)
    return RunData(train, BatchLoader(test_x, batch_size=200, shuffle=False), {"flips": args.flips}, test_x)


def evaluate(args, family, checkpoint):
    from pvae.inference import compare

    test_x = draw_coins(200, family.config.flips, 1).to(family.device)
    result = compare(family.model, family.guide, test_x, log_marginal=family.log_marginal, num_samples=200)
    payload = {"elbo": result.elbo / 200, "log_marginal": result.log_marginal / 200}
    return payload, f"ELBO {payload['elbo']:.3f}, exact log p(x) {payload['log_marginal']:.3f} nats per coin"


def picture(args, family, checkpoint):
    from pvae.plots import save_image_grid

    flips = family.config.flips
    side = max(d for d in range(1, math.isqrt(flips) + 1) if flips % d == 0)
    draws = family.sample(args.num).reshape(args.num, 1, side, flips // side)
    return save_image_grid(draws.cpu(), args.out, nrow=args.nrow)


register_commands(
    "coins",
    FamilyCommands(
        help="Beta–Bernoulli coins",
        add_arguments=add_arguments,
        data=data,
        config=lambda args, run_data: {"flips": args.flips},
        objectives=("elbo", "meanfield"),
        evaluate=evaluate,  # (args, family, checkpoint) -> (payload, text)
        sample=picture,  # (args, family, checkpoint) -> path written
    ),
)


def main(args):
    out = args.out
    train = ["train", "coins", "--flips", str(args.flips), "--epochs", str(args.epochs)]
    status = cli.main([*train, "--batch-size", "64", "--lr", "0.05", "--out", out, "--overwrite"])
    status = status or cli.main(["evaluate", os.path.join(out, "checkpoint.pt")])
    picture_path = os.path.join(out, "coins.png")
    status = status or cli.main(["sample", os.path.join(out, "checkpoint.pt"), "--out", picture_path])
    family = pvae.load(os.path.join(out, "checkpoint.pt"))
    draws = pyro.infer.Predictive(family.model, num_samples=3)(None, num_data=4)
    print(f"loaded {type(family).__name__}; prior predictive draws of x: {tuple(draws['x'].shape)}")
    return status


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a model/guide pair of your own, through pvae's CLI")
    parser.add_argument("--flips", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=os.path.join("runs", "own_family"))
    status = main(parser.parse_args())
    if status:
        raise SystemExit(status)

"""Benchmark: SVI steps/s on the exponential–Gaussian toy, pvae's ``fit`` vs a hand-written PyTorch loop.

Both sides compute the same single-particle ELBO for N = 1,000 data points,
E_q[log Exp(z; λ) + log N(x; z, σ) − log q(z | x)], with the same guide (per-datum truncated normal, or
the amortized network) and Adam with the same learning rate. pvae's side is ``pvae.inference.fit``
(Pyro SVI + Trace_ELBO, validation on as in the tests); the hand-written side is a plain loop with
``torch.optim.Adam``. Blocks of steps are interleaved (A B A B …) so machine noise hits both alike;
the table reports median steps/s and the time-per-step ratio pvae / hand-written (1.0 = parity).

Run: ``python benchmarks/toy_svi.py [--num-data 1000] [--steps 200] [--repeats 5]``
"""

import argparse
import statistics
import time

import pyro
import torch

from pvae.distributions import TruncatedNormal
from pvae.inference import fit
from pvae.models.toy import ExponentialGaussian


def pvae_block(family, guide_name, x, steps):
    guide = family.guide_named(guide_name)
    start = time.perf_counter()
    fit(family.model, guide, x, num_steps=steps, lr=1e-2, progress=False)
    return steps / (time.perf_counter() - start)


class HandWritten:
    """The same ELBO written directly in PyTorch, for the same guide."""

    def __init__(self, family, guide_name, x):
        self.x = x
        self.rate, self.scale = x.new_tensor(family.rate), x.new_tensor(family.scale)
        self.guide_name = guide_name
        if guide_name == "meanfield":
            self.loc = x.detach().clone().requires_grad_()
            self.raw_scale = torch.zeros_like(
                x
            ).requires_grad_()  # scale = softplus(raw)+… as Pyro's positive
            parameters = [self.loc, self.raw_scale]
        else:
            self.net = ExponentialGaussian(family.rate, family.scale)
            parameters = list(self.net.parameters())
        self.optimizer = torch.optim.Adam(parameters, lr=1e-2)

    def guide_parameters(self):
        if self.guide_name == "meanfield":
            return self.loc, self.raw_scale.exp()
        return self.net.amortized_parameters(self.x)

    def block(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            loc, scale = self.guide_parameters()
            q = TruncatedNormal(loc, scale, low=self.x.new_zeros(()))
            z = q.rsample()
            log_p = torch.distributions.Exponential(self.rate).log_prob(z) + torch.distributions.Normal(
                z, self.scale
            ).log_prob(self.x)
            loss = -(log_p - q.log_prob(z)).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # Pyro's SVI.step returns a float each step too
        return steps / (time.perf_counter() - start)


def main(args):
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    x = torch.distributions.Exponential(1.0).sample((args.num_data,)) + torch.randn(args.num_data)
    x = x.to(torch.float64 if args.float64 else torch.float32)
    rows = []
    for guide_name in ("meanfield", "amortized"):
        pyro.clear_param_store()
        family = ExponentialGaussian()
        hand = HandWritten(family, guide_name, x)
        pvae_block(family, guide_name, x, 10)  # warm-up both
        hand.block(10)
        pvae_rates, hand_rates = [], []
        for _ in range(args.repeats):
            pvae_rates.append(pvae_block(family, guide_name, x, args.steps))
            hand_rates.append(hand.block(args.steps))
        pvae_rate, hand_rate = statistics.median(pvae_rates), statistics.median(hand_rates)
        rows.append((guide_name, pvae_rate, hand_rate, hand_rate / pvae_rate))
    print(
        f"toy SVI, N = {args.num_data}, {args.steps} steps × {args.repeats} interleaved blocks, "
        f"torch threads = {torch.get_num_threads()}"
    )
    print("| guide | pvae `fit` steps/s | hand-written steps/s | time ratio pvae / hand-written |")
    print("| --- | ---: | ---: | ---: |")
    for guide_name, pvae_rate, hand_rate, ratio in rows:
        print(f"| {guide_name} | {pvae_rate:.0f} | {hand_rate:.0f} | {ratio:.2f}× |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--float64", action="store_true")
    main(parser.parse_args())

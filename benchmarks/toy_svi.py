"""Benchmark: SVI steps/s on the exponential–Gaussian toy, pvae's ``fit`` vs a hand-written PyTorch loop.

Both sides compute the same single-particle ELBO for N = 1,000 data points,
E_q[log Exp(z; λ) + log N(x; z, σ) − log q(z | x)], with the same guide (per-datum truncated normal, or
the amortized network) and Adam with the same learning rate. pvae's side is ``pvae.inference.fit``
(Pyro's Trace_ELBO, validation on as in the tests) with each step engine given by ``--engines``:
``eager`` and ``trace`` are :class:`pvae.inference.SVIStep`'s engines (``fit(..., engine=...)``, the
tracing of ``trace`` counted in every block, as each ``fit`` call records its step anew), ``svi`` is
Pyro's stock ``SVI.step`` (``fit(..., optim=pyro.optim.Adam(...))``, what ``fit`` ran before it used
SVIStep). The hand-written side is a plain loop with ``torch.optim.Adam``. Blocks of steps are
interleaved (hand, then each engine, the order rotated every round) so machine noise hits them alike;
the table reports median steps/s and the median over rounds of the time-per-step ratio pvae /
hand-written (1.0 = parity, below 1 = pvae faster).

Run: ``python benchmarks/toy_svi.py [--num-data 1000] [--steps 200] [--repeats 5]
[--engines svi eager trace] [--threads 1]``. With more than one thread, torch spreads even
1,000-element exp/log kernels over the threads, so on a machine whose other cores are busy every such
kernel waits for a time slice: time with ``--threads 1`` there.
"""

import argparse
import functools
import statistics
import time

import pyro
import pyro.optim
import torch

from pvae.distributions import TruncatedNormal
from pvae.inference import fit
from pvae.models.toy import ExponentialGaussian


def pvae_block(family, guide_name, x, steps, *, engine):
    guide = family.guide_named(guide_name)
    if engine == "svi":  # Pyro's SVI.step with Pyro's Adam
        options = {"optim": pyro.optim.Adam({"lr": 1e-2})}
    else:
        options = {"lr": 1e-2, "engine": engine}
    start = time.perf_counter()
    fit(family.model, guide, x, num_steps=steps, progress=False, **options)
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    x = torch.distributions.Exponential(1.0).sample((args.num_data,)) + torch.randn(args.num_data)
    x = x.to(torch.float64 if args.float64 else torch.float32)
    rows = []
    for guide_name in ("meanfield", "amortized"):
        pyro.clear_param_store()
        family = ExponentialGaussian()
        hand = HandWritten(family, guide_name, x)
        blocks = {"hand": hand.block}
        for engine in args.engines:
            blocks[engine] = functools.partial(pvae_block, family, guide_name, x, engine=engine)
        for block in blocks.values():  # warm-up
            block(10)
        rates = {name: [] for name in blocks}
        names = list(blocks)
        for index in range(args.repeats):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                rates[name].append(blocks[name](args.steps))
        hand_rate = statistics.median(rates["hand"])
        for engine in args.engines:
            ratio = statistics.median(h / p for h, p in zip(rates["hand"], rates[engine]))
            rows.append((guide_name, engine, statistics.median(rates[engine]), hand_rate, ratio))
    print(
        f"toy SVI, N = {args.num_data}, {args.steps} steps × {args.repeats} interleaved blocks, "
        f"torch threads = {torch.get_num_threads()}"
    )
    print("| guide | `fit` engine | pvae steps/s | hand-written steps/s | time ratio pvae / hand-written |")
    print("| --- | --- | ---: | ---: | ---: |")
    for guide_name, engine, pvae_rate, hand_rate, ratio in rows:
        print(f"| {guide_name} | {engine} | {pvae_rate:.0f} | {hand_rate:.0f} | {ratio:.2f}× |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["svi", "eager", "trace"],
        choices=["svi", "eager", "trace", "compile"],
        help="fit's step engines to time (svi: Pyro's stock SVI.step)",
    )
    main(parser.parse_args())

"""Benchmark: the same VAE trained through pvae's ``train`` and through a hand-written PyTorch loop.

Both sides train the same VAE (784 → hidden → z, LeakyReLU(0.2) encoder giving μ and log σ², ReLU decoder)
on the 4,000 mnist5k training digits, dynamically binarized by two ``BatchLoader``\\ s with the same seed (so
both see the same batches and the same binary draws), from the same initial weights, with Adam (lr 1e-3):

- **hand-written**: the usual VAE loop, eager PyTorch — ``BCE(sigmoid(decoder(z)), x, reduction="sum")``
  plus the analytic KL ½Σ(−log σ² + μ² + σ² − 1), ``torch.optim.Adam`` with its defaults;
- **pvae**: ``pvae.inference.train(VAE(...), loader, epochs=…, engine=…)`` — Pyro's Trace_ELBO for the
  family's model/guide (Monte-Carlo KL) on every step; ``--engines`` picks the step engines to time.

Epochs are interleaved (A B A B …: pvae's ``train`` calls back after each epoch and the hand-written epoch
runs there), so machine noise hits both sides alike; the table gives the median over epochs 2…E of
(pvae epoch time) / (hand-written epoch time). The first epoch is left out: it holds one-time costs
(recording the graph, compiling it), reported separately. Reference rows time Pyro's stock
``SVI.step`` (Trace_ELBO and JitTrace_ELBO, ``pyro.optim.Adam``) and ``torch.compile`` of the hand-written
step the same way, and ``--numpyro`` adds NumPyro's jitted SVI on the same network (needs jax and numpyro;
it runs in a child process, between two blocks of hand-written epochs, since XLA's worker threads slow
torch down when both live in one process).

Quality (``--quality-epochs``, same initial weights and batches): test log-likelihood of the hand-written
model and of pvae VAEs trained with Trace_ELBO, TraceMeanField_ELBO and IWAE-k (same epochs), as
log p(x) ≥ the IWAE estimate with k = ``--num-samples`` importance samples from each model's own encoder
(the hand-written model's weights are loaded into a pvae VAE, which is the same network), on the test digits
binarized once, ± the standard error over images, and the paired difference to the hand-written model on
the same images ± its standard error.

Run: ``python benchmarks/vae_vs_torch.py [--epochs 6] [--batch-sizes 32 128] [--z-dims 20 50]
[--engines eager trace compile] [--references] [--numpyro] [--quality-epochs 30] [--num-samples 1000]
[--threads N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch import nn

from pvae.data import BatchLoader, load_images
from pvae.inference import evaluate_log_likelihood, train
from pvae.models.vae import VAE

HIDDEN = 400


# ---- the hand-written reference ----------------------------------------------------------------------------
class ReferenceVAE(nn.Module):
    """The MLP encoder Linear → LeakyReLU(0.2) → Linear and decoder Linear → ReLU → Linear → sigmoid; its
    state dict has the same keys and shapes as pvae's VAE."""

    def __init__(self, z_dim: int, hidden_dim: int = HIDDEN):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(784, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 784), nn.Sigmoid()
        )

    def forward(self, x):
        mu, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


def negative_elbo(recon_x, x, mu, logvar):
    """The negative ELBO with the KL in closed form: the summed binary cross-entropy plus
    ½Σ(−log σ² + μ² + σ² − 1)."""
    bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())
    return bce + kld


class HandLoop:
    def __init__(self, model: ReferenceVAE, loader, compiled: bool = False):
        self.model, self.loader = model, loader
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(x):
            self.optimizer.zero_grad()
            recon, mu, logvar = self.model(x)
            loss = negative_elbo(recon, x, mu, logvar)
            loss.backward()
            self.optimizer.step()
            return loss.detach()

        self.step = torch.compile(step) if compiled else step

    def epoch(self) -> float:
        start = time.perf_counter()
        for x, _ in self.loader:
            self.step(x)
        return time.perf_counter() - start


# ---- pvae and stock Pyro -------------------------------------------------------------------------------
def pyro_svi_epoch(svi, loader) -> float:
    start = time.perf_counter()
    for x, _ in loader:
        svi.step(x)
    return time.perf_counter() - start


def make_data(seed: int):
    train_x = load_images("mnist5k", "train").flat()  # (4000, 784) grey levels
    test = load_images("mnist5k", "test")
    test_x = BatchLoader(test.flat(), batch_size=100, shuffle=False, binarize="static", seed=0).data
    return train_x, test_x


def loader(train_x, batch_size, seed):
    return BatchLoader(train_x, batch_size=batch_size, binarize="dynamic", seed=seed)


def interleave_pvae(engine, z_dim, batch_size, epochs, train_x, seed, jit=False):
    """pvae's train (A) against the hand-written loop (B), one epoch each in turn, same init and batches."""
    torch.manual_seed(seed)
    hand_model = ReferenceVAE(z_dim)
    family = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
    family.load_state_dict(hand_model.state_dict())
    hand = HandLoop(hand_model, loader(train_x, batch_size, seed))
    hand_times = []
    history = train(
        family,
        loader(train_x, batch_size, seed),
        epochs=epochs,
        engine=engine,
        jit=jit,
        seed=seed,
        progress=False,
        callback=lambda epoch, record: hand_times.append(hand.epoch()),
    )
    return history.epoch_seconds, hand_times, family, hand_model


def interleave_other(kind, z_dim, batch_size, epochs, train_x, seed):
    """A reference loop (stock Pyro SVI, or the compiled hand-written step) against the eager hand loop."""
    torch.manual_seed(seed)
    hand_model = ReferenceVAE(z_dim)
    other_model = ReferenceVAE(z_dim)
    other_model.load_state_dict(hand_model.state_dict())
    hand = HandLoop(hand_model, loader(train_x, batch_size, seed))
    if kind == "hand-compiled":
        other = HandLoop(other_model, loader(train_x, batch_size, seed), compiled=True)
        run_other = other.epoch
    else:
        family = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
        family.load_state_dict(hand_model.state_dict())
        elbo = JitTrace_ELBO(ignore_jit_warnings=True) if kind == "pyro-svi-jit" else Trace_ELBO()
        svi = SVI(family.model, family.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        data = loader(train_x, batch_size, seed)

        def run_other():
            return pyro_svi_epoch(svi, data)

    other_times, hand_times = [], []
    for _ in range(epochs):
        other_times.append(run_other())
        hand_times.append(hand.epoch())
    return other_times, hand_times


def summarize(times, hand_times) -> dict:
    ratios = [a / b for a, b in zip(times[1:], hand_times[1:])]
    return {
        "ratio": statistics.median(ratios),
        "epoch_s": statistics.median(times[1:]),
        "hand_epoch_s": statistics.median(hand_times[1:]),
        "first_extra_s": times[0] - statistics.median(times[1:]),
    }


def log_likelihood(family, test_x, num_samples, seed):
    batches = BatchLoader(test_x, batch_size=50, shuffle=False)
    return evaluate_log_likelihood(family, batches, num_samples=num_samples, seed=seed, progress=False)


def paired(a, b) -> tuple[float, float]:
    difference = a.per_image - b.per_image
    return difference.mean().item(), difference.std().item() / math.sqrt(difference.numel())


# ---- NumPyro (optional) --------------------------------------------------------------------------------
def numpyro_epochs(z_dim, batch_size, epochs, seed) -> list[float]:
    """NumPyro's jitted SVI on the same network (stax), fed the same binarized batches as numpy arrays."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from jax.example_libraries import stax
    from numpyro.infer import SVI as NSVI
    from numpyro.infer import Trace_ELBO as NTrace_ELBO

    encoder_init, encoder_apply = stax.serial(
        stax.Dense(HIDDEN), stax.LeakyRelu, stax.Dense(2 * z_dim)
    )  # LeakyRelu's default slope is 0.01; the VAE's is 0.2 — timing is unaffected
    decoder_init, decoder_apply = stax.serial(stax.Dense(HIDDEN), stax.Relu, stax.Dense(784))

    def model(x):
        decoder = numpyro.module("decoder", (decoder_init, decoder_apply), (batch_size, z_dim))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(0, 1).expand([z_dim]).to_event(1))
            numpyro.sample("x", ndist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        encoder = numpyro.module("encoder", (encoder_init, encoder_apply), (batch_size, 784))
        loc, log_var = jnp.split(encoder(x), 2, axis=-1)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Normal(loc, jnp.exp(0.5 * log_var)).to_event(1))

    train_x, _ = make_data(seed)
    data = loader(train_x, batch_size, seed)
    svi = NSVI(model, guide, numpyro.optim.Adam(1e-3), NTrace_ELBO())
    state = svi.init(jax.random.PRNGKey(seed), next(iter(data))[0].numpy())
    update = jax.jit(svi.update)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, _ in data:
            state, loss = update(state, x.numpy())
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return times


def interleave_numpyro(z_dim, batch_size, epochs, train_x, seed):
    """NumPyro in a child process (XLA's worker threads slow torch down when both share a process), between
    two blocks of hand-written epochs in this process; epochs pair up in order."""
    import subprocess

    torch.manual_seed(seed)
    hand = HandLoop(ReferenceVAE(z_dim), loader(train_x, batch_size, seed))
    before = [hand.epoch() for _ in range((epochs + 1) // 2)]
    command = [sys.executable, os.path.abspath(__file__), "--numpyro-child", str(z_dim), str(batch_size)]
    command += ["--epochs", str(epochs), "--seed", str(seed)]
    environment = dict(os.environ)
    if torch.get_num_threads() == 1:  # give XLA one thread too
        environment["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    completed = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    numpyro_times = json.loads(completed.stdout.strip().splitlines()[-1])
    after = [hand.epoch() for _ in range(epochs - len(before))]
    return numpyro_times, before + after


# ---- main ----------------------------------------------------------------------------------------------
def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(True)  # as in pvae's tests and defaults
    train_x, test_x = make_data(args.seed)
    test_x = test_x[: args.num_test]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f}; {args.epochs} epochs, medians over epochs 2..{args.epochs}",
        flush=True,
    )
    print(
        "| net | batch | loop | epoch s | hand-written epoch s | ratio (median) | first-epoch extra s |",
        flush=True,
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |", flush=True)
    for z_dim in args.z_dims:
        for batch_size in args.batch_sizes:
            net = f"784-{HIDDEN}-{z_dim}"
            runs = [(engine, None) for engine in args.engines]
            if args.references:
                runs += [("pyro-svi", None), ("pyro-svi-jit", None), ("hand-compiled", None)]
            if args.numpyro:
                runs += [("numpyro-jit", None)]
            for name, _ in runs:
                if name in ("eager", "trace", "compile", "jit"):
                    engine = "eager" if name == "jit" else name
                    times, hand_times, _, _ = interleave_pvae(
                        engine, z_dim, batch_size, args.epochs, train_x, args.seed, jit=name == "jit"
                    )
                    label = f"pvae train, engine={name}" if name != "jit" else "pvae train, jit=True"
                elif name == "numpyro-jit":
                    times, hand_times = interleave_numpyro(z_dim, batch_size, args.epochs, train_x, args.seed)
                    label = "NumPyro SVI, jax.jit"
                else:
                    times, hand_times = interleave_other(
                        name, z_dim, batch_size, args.epochs, train_x, args.seed
                    )
                    label = {
                        "pyro-svi": "Pyro SVI.step, Trace_ELBO",
                        "pyro-svi-jit": "Pyro SVI.step, JitTrace_ELBO",
                        "hand-compiled": "hand-written, torch.compile",
                    }[name]
                row = summarize(times, hand_times)
                print(
                    f"| {net} | {batch_size} | {label} | {row['epoch_s']:.3f} | {row['hand_epoch_s']:.3f} | "
                    f"{row['ratio']:.2f}× | {row['first_extra_s']:.1f} |",
                    flush=True,
                )
    if args.quality_epochs > 0 and args.num_samples > 0:
        quality_section(args, train_x, test_x)


def quality_section(args, train_x, test_x):
    batch_size, epochs, k = args.quality_batch_size, args.quality_epochs, args.num_samples
    print(
        f"\nTest log-likelihood, nats per image: IWAE bound with k = {k}, {test_x.shape[0]} mnist5k test "
        f"digits (binarized once), ± standard error over images; paired differences against the hand-written "
        f"model on the same images. {epochs} epochs at batch {batch_size}, same initial weights and "
        "batches.\n"
    )
    print("| net | trained by | epochs | train s | test log p(x) | minus hand-written (paired) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    engine = args.quality_engine
    for z_dim in args.z_dims:
        net = f"784-{HIDDEN}-{z_dim}"
        torch.manual_seed(args.seed)
        hand_model = ReferenceVAE(z_dim)
        initial = {key: value.clone() for key, value in hand_model.state_dict().items()}
        hand = HandLoop(hand_model, loader(train_x, batch_size, args.seed))
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        for _ in range(epochs):
            hand.epoch()
        hand_seconds = time.perf_counter() - start
        reference = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
        reference.load_state_dict(hand_model.state_dict())
        theirs = log_likelihood(reference, test_x, k, args.seed)
        print(
            f"| {net} | hand-written loop (BCE + analytic KL) | {epochs} | {hand_seconds:.0f} | "
            f"{theirs.log_likelihood:.2f} ± {theirs.stderr:.2f} | — |",
            flush=True,
        )
        runs = [("elbo", 1), ("meanfield", 1)]
        if args.iwae_particles > 1:
            runs.append(("iwae", args.iwae_particles))
        for objective, particles in runs:
            family = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
            family.load_state_dict(initial)
            start = time.perf_counter()
            train(
                family,
                loader(train_x, batch_size, args.seed),
                epochs=epochs,
                objective=objective,
                num_particles=particles,
                engine=engine,
                seed=args.seed,
                progress=False,
            )
            seconds = time.perf_counter() - start
            ours = log_likelihood(family, test_x, k, args.seed)
            difference, error = paired(ours, theirs)
            label = {
                "elbo": "pvae train, Trace_ELBO (Monte-Carlo KL)",
                "meanfield": "pvae train, TraceMeanField_ELBO (analytic KL)",
                "iwae": f"pvae train, IWAE-{particles}",
            }[objective]
            print(
                f"| {net} | {label}, engine={engine} | {epochs} | {seconds:.0f} | "
                f"{ours.log_likelihood:.2f} ± {ours.stderr:.2f} | {difference:+.2f} ± {error:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per timed run (default 6)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--z-dims", type=int, nargs="+", default=[20, 50], help="default: 20 and 50")
    parser.add_argument(
        "--engines", nargs="+", default=["eager", "trace", "compile"], help="pvae engines (and 'jit') to time"
    )
    parser.add_argument(
        "--references", action="store_true", help="also time stock Pyro SVI and compiled hand step"
    )
    parser.add_argument(
        "--numpyro", action="store_true", help="also time NumPyro's jitted SVI (needs numpyro)"
    )
    parser.add_argument("--quality-epochs", type=int, default=30, help="epochs of the quality runs (0: skip)")
    parser.add_argument("--quality-batch-size", type=int, default=128)
    parser.add_argument("--quality-engine", default="trace", help="pvae engine of the quality runs")
    parser.add_argument("--num-samples", type=int, default=1000, help="k for the test log-likelihood")
    parser.add_argument("--num-test", type=int, default=1000, help="test digits for the log-likelihood")
    parser.add_argument("--iwae-particles", type=int, default=5, help="k of the IWAE-trained model (1: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numpyro-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.numpyro_child:
        z_dim, batch_size = arguments.numpyro_child
        print(json.dumps(numpyro_epochs(z_dim, batch_size, arguments.epochs, arguments.seed)))
    else:
        main(arguments)
    sys.exit(0)

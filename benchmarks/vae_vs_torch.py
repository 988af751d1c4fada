"""Benchmark: the same VAE trained through pvae's ``train``, a hand-written PyTorch loop and NumPyro.

All sides train the same VAE (784 → hidden → z, LeakyReLU(0.2) encoder giving μ and log σ², ReLU decoder)
on the 4,000 mnist5k training digits, dynamically binarized by ``BatchLoader``\\ s built alike (so the
torch loops see the same batches and the same binary draws, NumPyro the same digits; the timed runs
drop the last incomplete batch, so every step has the full batch size), from the same initial weights,
with Adam (lr 1e-3):

- **hand-written**: the usual VAE loop, eager PyTorch — ``BCE(sigmoid(decoder(z)), x, reduction="sum")``
  plus the analytic KL ½Σ(−log σ² + μ² + σ² − 1), ``torch.optim.Adam`` with its defaults;
- **pvae**: ``pvae.inference.train(VAE(...), loader, epochs=…, engine=…)`` — Pyro's Trace_ELBO for the
  family's model/guide (Monte-Carlo KL) on every step; ``--engines`` picks the step engines to time;
- **NumPyro** (``--numpyro``): ``numpyro.infer.SVI`` with Trace_ELBO and ``numpyro.optim.Adam(1e-3)`` on the
  same network in stax (``benchmarks/_numpyro_vae.py``), as its users write it, in two rows:
  ``jax.jit(svi.update)`` called on each batch's NumPy array (converted on every call;
  ``block_until_ready`` at the end of the epoch), and the whole epoch as one jitted ``jax.lax.fori_loop``
  over the epoch's batches held on the device as one (batches, batch size, 784) array. It runs in a child
  process under ``--numpyro-python`` (a Python with jax and numpyro; neither torch nor pvae is imported
  there), which reads the digits of the torch loops' batches, in the same order, as grey levels from a
  ``.npz`` file, and gives XLA as many threads as torch has. Like the torch loops, which binarize each batch
  inside the timed epoch (``BatchLoader``), NumPyro binarizes each batch inside its timed epoch, with
  ``jax.random.bernoulli`` in the jitted function, as NumPyro's own VAE example does: the same digits and
  the same work, other binary draws of them.

Epochs are interleaved (pvae's ``train`` calls back after each epoch, and the hand-written epoch and then
NumPyro's two epochs run there; A B C D A B C D …), so machine noise hits every row alike; each row gives
the median epoch time over epochs 2…E and the median over those epochs of (its epoch time) / (the
hand-written epoch time of the same round), and with ``--numpyro`` the same paired median against
NumPyro's per-step epoch. The first epoch is left out: it holds one-time costs (recording the graph,
compiling it, ``jax.jit``), reported separately. NumPyro restarts from the initial weights with each pvae
run, so its rows pool the rounds of all of them. Reference rows time Pyro's stock ``SVI.step``
(Trace_ELBO and JitTrace_ELBO, ``pyro.optim.Adam``) and ``torch.compile`` of the hand-written step the
same way. With ``--numpyro`` a last table sets pvae's ``engine="compile"`` (or the first engine named)
side by side with NumPyro's two loops in the same rounds, with the train ELBO per image of the last epoch
of each (same objective, same data: they should agree to within the noise of a few epochs).

GEMM (``--gemm-rounds``, by default with ``--numpyro``): GFLOP/s of fp32 products at the VAE's shapes,
interleaved in rounds — a linear layer's forward and backward (batch × 784 × 400, as
``benchmarks/gemm.py`` times it) and a 2048³ product — for torch's default route (what ``nn.Linear``
runs), for the route pvae's ``engine="compile"`` gives it (``--gemm-backend``: the products traced by
``make_fx`` and compiled by Inductor as ``SVIStep`` does, with its passes: oneDNN for the products its
rule picks, MKL for the rest; or one of ``gemm.py``'s oneDNN routes),
and for XLA (``jax.jit`` in the NumPyro child).

Quality (``--quality-epochs``, same initial weights and batches): test log-likelihood of the hand-written
model and of pvae VAEs trained with Trace_ELBO, TraceMeanField_ELBO and IWAE-k (same epochs), as
log p(x) ≥ the IWAE estimate with k = ``--num-samples`` importance samples from each model's own encoder
(the hand-written model's weights are loaded into a pvae VAE, which is the same network), on the test digits
binarized once, ± the standard error over images, and the paired difference to the hand-written model on
the same images ± its standard error.

Run: ``python benchmarks/vae_vs_torch.py [--epochs 6] [--batch-sizes 32 128] [--z-dims 20 50]
[--engines eager trace compile] [--references] [--numpyro [--numpyro-python PATH]] [--gemm-rounds 5]
[--quality-epochs 30] [--num-samples 1000] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import gemm  # benchmarks/gemm.py, beside this script: its torch GEMM routes and timer
import numpy as np
import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from pvae.data import BatchLoader, load_images
from pvae.inference import evaluate_log_likelihood, train
from pvae.models.vae import VAE

HIDDEN = 400
PVAE_ENGINES = ("eager", "trace", "compile", "jit")
NUMPYRO_LOOPS = {  # row name → the child's loop
    "numpyro-step": "step",
    "numpyro-fori": "fori",
}
NUMPYRO_LABELS = {
    "numpyro-step": "NumPyro SVI, `jax.jit(svi.update)` per step",
    "numpyro-fori": "NumPyro SVI, whole epoch in a jitted `fori_loop`",
}
NUMPYRO_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numpyro_vae.py")
GEMM_BACKENDS = ("compile", "onednn", "onednn-prepacked")


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


def loader(train_x, batch_size, seed, drop_last=False):
    return BatchLoader(train_x, batch_size=batch_size, binarize="dynamic", seed=seed, drop_last=drop_last)


def timed_loader(train_x, batch_size, seed):
    """The batches of the timed runs: full batches only (a whole-epoch ``fori_loop`` needs one shape)."""
    return loader(train_x, batch_size, seed, drop_last=True)


SETTLE_SECONDS = [0.5]  # set by --settle


def settle() -> None:
    """Pause between two runtimes' epochs: the worker threads of the one that just ran (OpenMP's in torch,
    Eigen's in XLA) spin for a while after their work ends, which would slow the other's next epoch."""
    time.sleep(SETTLE_SECONDS[0])


def interleave_pvae(engine, z_dim, batch_size, epochs, train_x, seed, jit=False, numpyro=None):
    """pvae's train (A) against the hand-written loop (B) and NumPyro's two loops (C, D) when given, one
    epoch each in turn, same init and batches. Returns ({row: epoch seconds}, {row: last train ELBO})."""
    torch.manual_seed(seed)
    hand_model = ReferenceVAE(z_dim)
    family = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
    family.load_state_dict(hand_model.state_dict())
    hand = HandLoop(hand_model, timed_loader(train_x, batch_size, seed))
    times, elbos = {"hand": []}, {}
    if numpyro is not None:
        numpyro.reset()

    def after_epoch(epoch, history):
        settle()
        times["hand"].append(hand.epoch())
        if numpyro is not None:
            settle()
            numpyro.epoch(epoch - 1, times, elbos)
            settle()

    history = train(
        family,
        timed_loader(train_x, batch_size, seed),
        epochs=epochs,
        engine=engine,
        jit=jit,
        seed=seed,
        progress=False,
        callback=after_epoch,
    )
    times["pvae"], elbos["pvae"] = history.epoch_seconds, history.train_elbo[-1]
    return times, elbos


def interleave_other(kind, z_dim, batch_size, epochs, train_x, seed):
    """A reference loop (stock Pyro SVI, or the compiled hand-written step) against the eager hand loop."""
    torch.manual_seed(seed)
    hand_model = ReferenceVAE(z_dim)
    other_model = ReferenceVAE(z_dim)
    other_model.load_state_dict(hand_model.state_dict())
    hand = HandLoop(hand_model, timed_loader(train_x, batch_size, seed))
    if kind == "hand-compiled":
        other = HandLoop(other_model, timed_loader(train_x, batch_size, seed), compiled=True)
        run_other = other.epoch
    else:
        family = VAE(x_dim=784, z_dim=z_dim, hidden_dim=HIDDEN)
        family.load_state_dict(hand_model.state_dict())
        elbo = JitTrace_ELBO(ignore_jit_warnings=True) if kind == "pyro-svi-jit" else Trace_ELBO()
        svi = SVI(family.model, family.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        data = timed_loader(train_x, batch_size, seed)

        def run_other():
            return pyro_svi_epoch(svi, data)

    other_times, hand_times = [], []
    for _ in range(epochs):
        other_times.append(run_other())
        hand_times.append(hand.epoch())
    return other_times, hand_times


def interleave_numpyro(z_dim, batch_size, epochs, train_x, seed, numpyro):
    """NumPyro's two loops against the hand-written loop alone (when no pvae engine is timed)."""
    torch.manual_seed(seed)
    hand = HandLoop(ReferenceVAE(z_dim), timed_loader(train_x, batch_size, seed))
    times, elbos = {"hand": []}, {}
    numpyro.reset()
    for index in range(epochs):
        times["hand"].append(hand.epoch())
        settle()
        numpyro.epoch(index, times, elbos)
        settle()
    return times, elbos


def paired_median(times, other) -> float:
    """Median over epochs 2… of times[i] / other[i]."""
    return statistics.median(a / b for a, b in zip(times[1:], other[1:]))


def summarize(times, hand_times, versus=None) -> dict:
    """Medians over epochs 2… of one run: the epoch time, the hand-written one, their paired ratio, that
    against ``versus`` (NumPyro's per-step epoch of the same rounds) when given, and the first epoch's
    excess over the median."""
    return {
        "ratio": paired_median(times, hand_times),
        "epoch_s": statistics.median(times[1:]),
        "hand_epoch_s": statistics.median(hand_times[1:]),
        "first_extra_s": times[0] - statistics.median(times[1:]),
        "versus": None if versus is None else paired_median(times, versus),
    }


def summarize_pooled(runs, name, versus=None) -> dict:
    """As :func:`summarize` over epochs 2… of several runs (NumPyro's rows, run beside each pvae engine);
    the first-epoch excess is that of the first run (the one that compiled)."""
    pairs = [
        (run[name][i], run["hand"][i], run[versus][i] if versus else 1.0)
        for run in runs
        for i in range(1, len(run[name]))
    ]
    median = statistics.median(pair[0] for pair in pairs)
    return {
        "ratio": statistics.median(a / b for a, b, _ in pairs),
        "epoch_s": median,
        "hand_epoch_s": statistics.median(pair[1] for pair in pairs),
        "first_extra_s": runs[0][name][0] - median,
        "versus": statistics.median(a / c for a, _, c in pairs) if versus else None,
    }


def log_likelihood(family, test_x, num_samples, seed):
    batches = BatchLoader(test_x, batch_size=50, shuffle=False)
    return evaluate_log_likelihood(family, batches, num_samples=num_samples, seed=seed, progress=False)


def paired(a, b) -> tuple[float, float]:
    difference = a.per_image - b.per_image
    return difference.mean().item(), difference.std().item() / math.sqrt(difference.numel())


# ---- NumPyro (optional): a child process under another Python ------------------------------------------
def check_numpyro_python(python: str) -> None:
    """Exit with one line naming ``--numpyro-python`` unless ``python`` imports jax and numpyro."""
    try:
        completed = subprocess.run(
            [python, "-c", "import jax, numpy, numpyro"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        if completed.returncode == 0:
            return
        lines = completed.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"exit status {completed.returncode}"
    sys.exit(
        f"error: --numpyro-python {python} cannot import jax and numpyro ({reason}); install them there "
        "(pip install jax jaxlib numpyro numpy) or pass --numpyro-python the Python of a venv that has them"
    )


class NumPyroChild:
    """``benchmarks/_numpyro_vae.py`` under ``python``: one JSON request and one JSON reply per line."""

    def __init__(self, python: str, threads: int):
        self.log = tempfile.TemporaryFile("w+")  # its stderr, shown when it stops
        environment = dict(os.environ, JAX_PLATFORMS="cpu")
        self.process = subprocess.Popen(
            [python, NUMPYRO_SCRIPT, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=environment,
        )

    def ask(self, op: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.seek(0)
            tail = "\n".join(self.log.read().strip().splitlines()[-20:])
            raise RuntimeError(f"the NumPyro child process stopped on {op!r}; its stderr ends:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


class NumPyroRows:
    """NumPyro's two loops for one net and batch size, on the batches the torch runs see."""

    def __init__(self, child: NumPyroChild, train_x, z_dim, batch_size, epochs, seed):
        self.child = child
        # the digits of the torch loops' batches, in the same order, as grey levels: the loader built alike
        # with each digit's index as its label (labels take no random draws, so the order is the same)
        data = BatchLoader(
            train_x,
            torch.arange(len(train_x)),
            batch_size=batch_size,
            binarize="dynamic",
            seed=seed,
            drop_last=True,
        )
        grey = torch.stack([torch.stack([train_x[index] for _, index in data]) for _ in range(epochs)])
        levels = (grey * 255).round()
        if not torch.equal(levels / 255, grey):
            raise ValueError("the digits are not on the 256-level grid that the NumPyro child reads")
        torch.manual_seed(seed)
        initial = ReferenceVAE(z_dim).state_dict()  # the initial weights of every torch run
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "batches.npz")
            np.savez(
                path,
                batches=levels.to(torch.uint8).numpy(),
                **{name: value.numpy() for name, value in initial.items()},
            )
            self.child.ask("load", path=path, key=seed)

    def reset(self) -> None:
        self.child.ask("reset")

    def epoch(self, index: int, times: dict, elbos: dict) -> None:
        for name, loop in NUMPYRO_LOOPS.items():
            reply = self.child.ask("epoch", loop=loop, index=index)
            times.setdefault(name, []).append(reply["seconds"])
            elbos[name] = reply["elbo"]


# ---- GEMM: torch's default route, pvae's, XLA -----------------------------------------------------------
def compiled_like_pvae(function, *inputs):
    """``function`` on ``inputs`` recorded into aten operations by ``make_fx`` and compiled by Inductor
    (``torch._inductor.compile``) with the settings and passes ``SVIStep(engine="compile")`` gives a step
    (its GEMM route included: oneDNN where ``pvae.inference.compile_passes.onednn_wins`` picks it)."""
    import torch._inductor

    from pvae.inference.step import _inductor_patches  # the compile engine's Inductor settings

    graph = make_fx(function)(*inputs)
    return partial(torch._inductor.compile(graph, list(inputs), options=_inductor_patches({})), *inputs)


def torch_products(kind, backend, rows, width_in, width_out, generator):
    """(torch's default route, the ``backend`` route) for one product, as calls without arguments.

    ``linear``: a linear layer's forward and backward (``gemm.py``'s routes); ``matmul``: Y = X Wᵀ alone."""
    if kind == "linear":
        tensors = gemm.layer_inputs(rows, width_in, width_out, generator)
        routes = {"onednn": gemm.onednn_layer, "onednn-prepacked": gemm.prepacked_layer}
        default = partial(gemm.default_layer, *tensors)
        if backend == "compile":
            return default, compiled_like_pvae(gemm.default_layer, *tensors)
        return default, partial(routes[backend], *tensors)
    x = torch.randn(rows, width_in, generator=generator)
    weight = torch.randn(width_out, width_in, generator=generator) / width_in**0.5
    default = partial(F.linear, x, weight)
    if backend == "compile":
        return default, compiled_like_pvae(F.linear, x, weight)
    if backend == "onednn":
        return default, partial(gemm.linear_pointwise, x, weight)

    def prepacked():
        return gemm.linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight, rows))

    return default, prepacked


def gemm_section(args, child: NumPyroChild | None, command: str) -> None:
    shapes = [("linear", batch, 784, HIDDEN) for batch in sorted(set(args.batch_sizes))]
    shapes.append(("matmul", 2048, 2048, 2048))
    blas = "MKL" if torch.backends.mkl.is_available() else "BLAS"
    backend_label = {
        "compile": 'pvae `engine="compile"` (make_fx → Inductor, its GEMM route)',
        "onednn": "oneDNN `_linear_pointwise`",
        "onednn-prepacked": "oneDNN, prepacked weight",
    }[args.gemm_backend]
    columns = {"default": f"torch default (`nn.Linear`, {blas})", "backend": backend_label}
    if child is not None:
        columns["xla"] = "XLA (`jax.jit`)"
    print(
        f"\nfp32 GEMM, GFLOP/s (× torch default), {torch.get_num_threads()} thread(s): medians over "
        f"{args.gemm_rounds} interleaved rounds of ≈{args.gemm_seconds} s per cell\n"
    )
    print(f"<!-- {command} -->")
    print("| product | " + " | ".join(columns.values()) + " |")
    print("| --- |" + " ---: |" * len(columns))
    generator = torch.Generator().manual_seed(0)
    for kind, rows, width_in, width_out in shapes:
        default, chosen = torch_products(kind, args.gemm_backend, rows, width_in, width_out, generator)
        calls = {"default": default, "backend": chosen}
        for call in calls.values():
            call()  # warm up (compiles)
        request = {"kind": kind, "shape": [rows, width_in, width_out], "seconds": args.gemm_seconds}
        if child is not None:
            child.ask("gemm", **{**request, "seconds": 0.0})  # warm up (compiles)
        names = list(columns)
        times = {name: [] for name in names}
        for index in range(args.gemm_rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                if name == "xla":
                    times[name].append(child.ask("gemm", **request)["seconds"])
                else:
                    times[name].append(gemm.time_call(calls[name], args.gemm_seconds))
        flop = (6 if kind == "linear" else 2) * rows * width_in * width_out
        summary = gemm.summarize(times, flop, "default")
        label = (
            f"linear forward + backward, {rows} × {width_in} × {width_out}"
            if kind == "linear"
            else f"matmul {rows} × {width_in} × {width_out}"
        )
        cells = [f"{summary['default'][0]:.0f}"] + [
            f"{summary[name][0]:.0f} ({summary[name][1]:.2f}×)" for name in names[1:]
        ]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


# ---- main ----------------------------------------------------------------------------------------------
def print_row(net, batch_size, label, row) -> None:
    versus = "—" if row["versus"] is None else f"{row['versus']:.2f}×"
    print(
        f"| {net} | {batch_size} | {label} | {row['epoch_s']:.3f} | {row['hand_epoch_s']:.3f} | "
        f"{row['ratio']:.2f}× | {versus} | {row['first_extra_s']:.1f} |",
        flush=True,
    )


def engine_label(name: str) -> str:
    return f"pvae train, engine={name}" if name != "jit" else "pvae train, jit=True"


def side_by_side_row(net, batch_size, times, elbos) -> str:
    """One line of the pvae-versus-NumPyro table, from the rounds of one pvae run."""
    hand = statistics.median(times["hand"][1:])

    def cell(name):
        return f"{statistics.median(times[name][1:]):.3f} ({paired_median(times[name], times['hand']):.2f}×)"

    return (
        f"| {net} | {batch_size} | {hand:.3f} | {cell('pvae')} | {cell('numpyro-step')} | "
        f"{cell('numpyro-fori')} | {paired_median(times['pvae'], times['numpyro-step']):.2f}× | "
        f"{elbos['pvae']:.1f} / {elbos['numpyro-step']:.1f} / {elbos['numpyro-fori']:.1f} |"
    )


def main(args):
    SETTLE_SECONDS[0] = args.settle
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    child = None
    if args.numpyro:
        check_numpyro_python(args.numpyro_python)
        child = NumPyroChild(args.numpyro_python, torch.get_num_threads())
    try:
        run(args, child, command)
    finally:
        if child is not None:
            child.close()


def run(args, child, command):
    pyro.enable_validation(True)  # as in pvae's tests and defaults
    train_x, test_x = make_data(args.seed)
    test_x = test_x[: args.num_test]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = ""
    if child is not None:
        found = child.ask("versions")
        versions = f", jax {found['jax']}, numpyro {found['numpyro']} (XLA on {found['threads']} thread(s))"
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}{versions}, {torch.get_num_threads()} torch "
        f"threads, load average {load:.1f}; {args.epochs} epochs, medians over epochs 2..{args.epochs}",
        flush=True,
    )
    print(f"<!-- {command} -->", flush=True)
    print(
        "| net | batch | loop | epoch s | hand-written epoch s | × hand-written | × NumPyro jit per step "
        "| first-epoch extra s |",
        flush=True,
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    engines = list(args.engines)
    side_engine = "compile" if "compile" in engines else (engines[0] if engines else None)
    side_by_side = []
    for z_dim in args.z_dims:
        for batch_size in args.batch_sizes:
            net = f"784-{HIDDEN}-{z_dim}"
            numpyro = None
            if child is not None:
                numpyro = NumPyroRows(child, train_x, z_dim, batch_size, args.epochs, args.seed)
            numpyro_runs = []
            for name in engines:
                times, elbos = interleave_pvae(
                    "eager" if name == "jit" else name,
                    z_dim,
                    batch_size,
                    args.epochs,
                    train_x,
                    args.seed,
                    jit=name == "jit",
                    numpyro=numpyro,
                )
                versus = times.get("numpyro-step")
                print_row(
                    net, batch_size, engine_label(name), summarize(times["pvae"], times["hand"], versus)
                )
                if numpyro is not None:
                    numpyro_runs.append(times)
                    if name == side_engine:
                        side_by_side.append(side_by_side_row(net, batch_size, times, elbos))
            if numpyro is not None and not engines:
                times, _ = interleave_numpyro(z_dim, batch_size, args.epochs, train_x, args.seed, numpyro)
                numpyro_runs.append(times)
            if args.references:
                for name in ("pyro-svi", "pyro-svi-jit", "hand-compiled"):
                    times, hand_times = interleave_other(
                        name, z_dim, batch_size, args.epochs, train_x, args.seed
                    )
                    label = {
                        "pyro-svi": "Pyro SVI.step, Trace_ELBO",
                        "pyro-svi-jit": "Pyro SVI.step, JitTrace_ELBO",
                        "hand-compiled": "hand-written, torch.compile",
                    }[name]
                    print_row(net, batch_size, label, summarize(times, hand_times))
            for name in NUMPYRO_LOOPS if numpyro_runs else ():
                versus = "numpyro-step" if name != "numpyro-step" else None
                print_row(net, batch_size, NUMPYRO_LABELS[name], summarize_pooled(numpyro_runs, name, versus))
    if side_by_side:
        print(
            f"\n{engine_label(side_engine)} beside NumPyro, epoch s (× hand-written eager torch) in the same "
            f"rounds, medians over epochs 2..{args.epochs}; train ELBO per image of epoch {args.epochs}\n"
        )
        print(f"<!-- {command} -->")
        print(
            f"| net | batch | hand-written eager torch | {engine_label(side_engine)} | "
            "NumPyro `jax.jit(svi.update)` per step | NumPyro whole-epoch `fori_loop` | "
            "pvae / NumPyro per step | train ELBO: pvae / NumPyro step / `fori_loop` |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for line in side_by_side:
            print(line, flush=True)
    if args.gemm_rounds > 0:
        gemm_section(args, child, command)
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
        "--engines",
        nargs="*",
        choices=PVAE_ENGINES,
        default=["eager", "trace", "compile"],
        help="pvae engines (and 'jit') to time; none: only the references and NumPyro",
    )
    parser.add_argument(
        "--references", action="store_true", help="also time stock Pyro SVI and compiled hand step"
    )
    parser.add_argument(
        "--numpyro",
        action="store_true",
        help="also time NumPyro's SVI, jitted per step and as a whole-epoch fori_loop (needs jax, numpyro)",
    )
    parser.add_argument(
        "--numpyro-python",
        default=sys.executable,
        metavar="PATH",
        help="the Python that runs NumPyro, with jax and numpyro installed (default: this one)",
    )
    parser.add_argument(
        "--gemm-rounds",
        type=int,
        default=None,
        help="rounds of the GEMM table (0: skip; default: 5 with --numpyro, else 0)",
    )
    parser.add_argument("--gemm-seconds", type=float, default=0.05, help="seconds per GEMM cell and round")
    parser.add_argument(
        "--gemm-backend",
        choices=GEMM_BACKENDS,
        default="compile",
        help="the route timed beside torch's default: pvae's compile engine (default) or a oneDNN route",
    )
    parser.add_argument("--quality-epochs", type=int, default=30, help="epochs of the quality runs (0: skip)")
    parser.add_argument("--quality-batch-size", type=int, default=128)
    parser.add_argument("--quality-engine", default="trace", help="pvae engine of the quality runs")
    parser.add_argument("--num-samples", type=int, default=1000, help="k for the test log-likelihood")
    parser.add_argument("--num-test", type=int, default=1000, help="test digits for the log-likelihood")
    parser.add_argument("--iwae-particles", type=int, default=5, help="k of the IWAE-trained model (1: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds of pause between epochs of different runtimes (their threads spin after work)",
    )
    arguments = parser.parse_args()
    if arguments.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is left out of the medians)")
    if arguments.gemm_rounds is None:
        arguments.gemm_rounds = 5 if arguments.numpyro else 0
    main(arguments)

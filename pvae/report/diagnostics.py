"""Report section "Did the guide work?": SBC, Pareto k̂ and the inference gaps (:mod:`pvae.inference`) on the
toy's guides, where the answer is known, and on a VAE trained for the purpose."""

from __future__ import annotations

import math
import os
import time

from pvae.report import ReportContext, report_section

#: The deliberately wrong guide: the exact posterior with its scale multiplied by this.
NARROW_FACTOR = 0.4
#: Guide draws per simulated datum for SBC (ranks lie in 0..M; M + 1 = 100 fills 20 bins evenly).
SBC_DRAWS = 99


class OnSimulatedData:
    """A guide that keeps the data it is first called with, and may first fit itself there.

    SBC draws its data from the model, so a guide with one parameter per datum (the toy's ``meanfield``
    and ``lognormal``) can only be fitted once those data exist: ``fit(x) -> losses`` runs at the first call
    (with gradients on, blocked from any handler around the call); later calls must bring the same data,
    which stay in ``data`` for the checks that follow (k̂ on the same x).
    """

    def __init__(self, guide, fit=None):
        self.guide, self.fit = guide, fit
        self.data = None
        self.losses: list[float] = []
        self.seconds = 0.0

    def __call__(self, x, num_data=None):
        import pyro.poutine as poutine
        import torch

        if self.data is None:
            if self.fit is not None:
                start = time.perf_counter()
                with torch.enable_grad(), poutine.block():
                    self.losses = self.fit(x)
                self.seconds = time.perf_counter() - start
            self.data = x
        elif x is not self.data:
            raise ValueError("this guide was set up on other data; build a new one")
        return self.guide(x, num_data)


def narrow_guide(family, factor: float = NARROW_FACTOR):
    """The toy's exact posterior with its scale × ``factor``: too narrow for factor < 1."""
    import pyro

    from pvae.distributions import TruncatedNormal

    def guide(x, num_data=None):
        exact = family.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", TruncatedNormal(exact.loc, factor * exact.scale, low=x.new_zeros(())))

    return guide


@report_section(15)
def diagnostics(ctx: ReportContext) -> str:
    """SBC, k̂ and gaps of the toy's guides and a narrow one; the gaps of a VAE on digits (full report)."""
    from pvae.utils import torch_threads

    # one thread: the toy's scalars and the VAE's small batches gain little from a second, and lose much
    # when the cores are shared with other work
    with torch_threads(1):
        return _toy_diagnostics(ctx) + "\n" + _vae_gaps(ctx)


def _khat_cells(khat) -> tuple[str, str, str]:
    """k̂ mean, max and the share above 0.7, as table cells (−∞: weights without a tail)."""
    from pvae.inference import KHAT_UNRELIABLE

    def cell(value: float) -> str:
        return "−∞" if value == -math.inf else f"{value:.2f}"

    finite = khat[khat.isfinite()]
    mean = cell(finite.mean().item()) if finite.numel() == khat.numel() else cell(khat.mean().item())
    return mean, cell(khat.max().item()), f"{(khat > KHAT_UNRELIABLE).double().mean().item():.0%}"


def _toy_diagnostics(ctx: ReportContext) -> str:
    import torch

    from pvae.inference import inference_gaps, pareto_khat, sbc
    from pvae.models.toy import DEFAULT_AMORTIZED_STEPS, GUIDES, ExponentialGaussian
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    like = {"dtype": torch.float64, "device": device}
    family = ExponentialGaussian().to(**like)
    num_data, num_samples, gap_steps = (300, 1000, 200) if ctx.quick else (500, 1000, 300)
    # the toy section's step counts, quick; in full, its per-datum defaults and half its amortized default
    step_counts = {"exact": 0, "meanfield": 300, "lognormal": 300, "amortized": 600}
    if not ctx.quick:
        step_counts |= {"meanfield": None, "lognormal": None, "amortized": DEFAULT_AMORTIZED_STEPS // 2}
    results, rows = {}, []
    for name in GUIDES + ("narrow",):
        steps = step_counts.get(name)
        if name == "narrow":
            guide = OnSimulatedData(narrow_guide(family))
        elif name == "amortized":  # fitted once on the toy's grid of x, then used for any x
            start = time.perf_counter()
            amortized, losses = family.fit_guide(
                name, family.amortized_training_data(**like), steps, ctx.seed
            )
            guide = OnSimulatedData(amortized)
            guide.losses, guide.seconds = losses, time.perf_counter() - start
        elif name == "exact":
            guide = OnSimulatedData(family.exact_guide)
        else:  # per datum: fitted to the simulated x

            def fit(x, name=name, steps=steps):
                return family.fit_guide(name, x, steps, ctx.seed)[1]

            guide = OnSimulatedData(family.guide_named(name), fit)
        # one simulated data set of num_data independent (z, x) pairs: the toy's data share no latent
        result = sbc(
            family.model,
            guide,
            num_simulations=1,
            num_posterior_samples=SBC_DRAWS,
            num_data=num_data,
            seed=ctx.seed,
        )
        x, losses, seconds = guide.data, guide.losses, guide.seconds
        seed_everything(ctx.seed)
        khat = pareto_khat(family.model, guide, x, num_samples=num_samples)
        results[name] = result
        band = result.ecdf_band("z")
        mean, largest, unreliable = _khat_cells(khat)
        rows.append(
            f"| {name} | {len(losses)} | {seconds:.1f} | {result.p_values['z']:.2g} | "
            f"{'yes' if band.inside else '**no**'} | {mean} | {largest} | {unreliable} |"
        )
        if name == "amortized":
            seed_everything(ctx.seed)
            gaps = inference_gaps(
                family.model,
                guide,
                x,
                log_marginal=family.log_marginal,
                num_samples=num_samples,
                num_steps=gap_steps,
            )
    low, high = _tail_shares(results["narrow"])
    exact_low, exact_high = _tail_shares(results["exact"])
    picture = plot_ecdf_pair(
        {"exact": results["exact"], f"narrow (scale × {NARROW_FACTOR})": results["narrow"]},
        os.path.join(ctx.out, "diagnostics_sbc_ecdf.png"),
    )
    lines = [
        "## Did the guide work? SBC, Pareto k̂ and the inference gaps",
        "",
        "Three checks of a guide against its model, on the toy where the posterior is known",
        "(`pvae.inference`: `sbc`, `pareto_khat`, `inference_gaps`). SBC (Talts et al. 2018): draw",
        f"{num_data} pairs (z̃, x) from the model, {SBC_DRAWS} draws from the guide for each x, and rank z̃",
        "among them; the ranks are uniform for every pair only if the guide is the posterior (χ² test on 20",
        "bins; ECDF band: Säilynoja et al. 2022). Pareto k̂ (Yao et al. 2018) of the importance weights",
        f"p(x, z)/q(z | x), {num_samples} draws per x, on the same x: below 0.5 good, above 0.7 unreliable.",
        "The per-datum guides are fitted by SVI to the simulated x (the toy's recipe); the amortized one",
        f"on its grid of x. The narrow guide is the exact posterior with its scale × {NARROW_FACTOR}.",
        "",
        "| guide | fit steps | fit s | SBC χ² p | ECDF in 95% band | k̂ mean | k̂ max | k̂ > 0.7 |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        *rows,
        "",
        "k̂ = −∞: constant weights, the guide is the posterior. A guide too narrow leaves z̃ in the tails",
        "of its draws too often, so its ranks pile up at the ends; narrowing this truncated normal also",
        "pulls its draws towards the bound at 0, so z̃ lies above them more often than below. Of the narrow",
        f"guide's ranks, {low:.0%} fall in the bottom tenth and {high:.0%} in the top tenth (10% each",
        f"for a calibrated guide; the exact one: {exact_low:.0%} and {exact_high:.0%}):",
        "",
        f"![SBC: exact vs narrow guide]({os.path.basename(picture)})",
        "",
        "The amortized guide's inference gap split into the approximation gap (its TruncatedNormal family,",
        "which holds the posterior) and the amortization gap (one network for all x), Cremer, Li &",
        f"Duvenaud (2018), with q* fitted per datum in {gap_steps} steps and log p(x) exact (nats per datum,",
        f"means over the {num_data} x):",
        "",
        "```",
        gaps.table(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _tail_shares(result) -> tuple[float, float]:
    """Shares of the ranks of site ``"z"`` in the bottom and the top tenth of 0..M."""
    ranks = result.ranks["z"].double() / result.num_posterior_samples  # in [0, 1]
    return (ranks < 0.1).double().mean().item(), (ranks > 0.9).double().mean().item()


def plot_ecdf_pair(results: dict, path: str, level: float = 0.95) -> str:
    """ECDF difference of the ranks of site ``"z"`` of several SBC results on one axis, with the
    simultaneous ``level`` band of the first (the results share L and M, so their bands agree)."""
    from matplotlib.figure import Figure

    from pvae.plots import _check_path, _save_figure

    path = _check_path(path)
    figure = Figure(figsize=(5.6, 3.6))
    axis = figure.add_subplot()
    for index, (label, result) in enumerate(results.items()):
        band = result.ecdf_band("z", level=level)
        fractions = band.fractional_ranks.cpu().numpy()
        if index == 0:
            band.draw_band(axis)
        axis.step(
            fractions,
            band.ecdf_difference.cpu().numpy(),
            where="mid",
            label=f"{label}: χ² p = {result.p_values['z']:.2g}",
        )
    axis.axhline(0.0, color="k", linewidth=0.6)
    axis.set_xlim(0.0, 1.0)
    axis.set_xlabel("fractional rank of z̃ among the guide's draws")
    axis.set_ylabel("ECDF − uniform")
    first = next(iter(results.values()))
    axis.set_title(
        f"SBC on the toy: {first.num_simulations * first.num_data} draws, M = {first.num_posterior_samples}",
        fontsize=10,
    )
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save_figure(figure, path)


def _vae_gaps(ctx: ReportContext) -> str:
    """k̂ and the gaps of a VAE trained here (784-400-20, a few epochs), on 200 test digits."""
    if ctx.quick:
        return (
            "The VAE's gaps on digits are in the full report (`pvae demo` without `--quick`); `pvae diagnose "
            "CHECKPOINT` measures k̂ and the gaps of any trained VAE.\n"
        )
    from pvae.data import BatchLoader
    from pvae.inference import inference_gaps, pareto_khat, train
    from pvae.models.vae import VAE
    from pvae.report.autoencoders import image_split, image_test_loader
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    num_train, num_test, epochs, num_samples, num_steps = 2000, 200, 10, 1000, 200
    train_x, _ = image_split("mnist5k", "train", None, num_train, ctx.seed)
    test_x, test_labels = image_split("mnist5k", "test", None, num_test, ctx.seed)
    family = VAE(x_dim=784, z_dim=20, hidden_dim=400).to(device)
    loader = BatchLoader(train_x.to(device), batch_size=128, binarize="dynamic", seed=ctx.seed)
    start = time.perf_counter()
    history = train(family, loader, epochs=epochs, seed=ctx.seed, progress=True)
    family.eval()
    training = time.perf_counter() - start
    x = image_test_loader(test_x, test_labels, "dynamic", device).data  # (200, 784), binarized once
    start = time.perf_counter()
    seed_everything(ctx.seed)
    khat = pareto_khat(family.model, family.guide, x, num_samples=num_samples)
    seed_everything(ctx.seed)
    gaps = inference_gaps(
        family.model, family.guide, x, num_samples=num_samples, num_steps=num_steps, num_particles=2
    )
    seconds = time.perf_counter() - start
    mean, largest, unreliable = _khat_cells(khat.double())
    return "\n".join(
        [
            f"A VAE (784-400-20, Bernoulli likelihood) trained here for {epochs} epochs on {num_train}",
            f"digits ({training:.0f} s; final train ELBO {history.train_elbo[-1]:.1f} nats), diagnosed on",
            f"{num_test} test digits in {seconds:.0f} s. Its k̂ ({num_samples} draws per digit): mean {mean},",
            f"max {largest}, {unreliable} of the digits above 0.7. Its gaps, q* the Gaussian guide family",
            f"fitted per digit ({num_steps} steps), log p(x) the IWAE-{num_samples} estimate (a lower bound,",
            "so the approximation gap is one too):",
            "",
            "```",
            gaps.table(),
            "```",
            "",
            "`pvae diagnose CHECKPOINT` prints the same for a trained checkpoint (`--sbc` adds",
            "calibration).",
            "",
        ]
    )

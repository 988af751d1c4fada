"""The family contract end to end: a model/guide pair defined here, in a test, with no edit to pvae, is
registered, trained, checkpointed, loaded, evaluated and sampled through the ``pvae`` command line.

The pair: θ_i ~ Beta(a, b), x_i | θ_i ~ Bernoulli(θ_i)^D (D coin flips per datum), an amortized Beta
guide on the number of heads. Its evidence is exact (the beta-binomial's, per sequence of flips):
log p(x) = log B(a + h, b + D − h) − log B(a, b), h = Σ x, so the CLI's evaluation is checked against it.
"""

import json
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn.functional import softplus

import pvae
from pvae import cli
from pvae.cli import FamilyCommands, RunData, register_commands
from pvae.cli.common import positive_int


@dataclass
class BetaBernoulliConfig:
    flips: int = 16
    a: float = 2.0
    b: float = 3.0
    name: str | None = None


@pvae.register_family("test-beta-bernoulli")
class BetaBernoulli(pvae.Family):
    config_class = BetaBernoulliConfig

    def __init__(self, flips: int = 16, a: float = 2.0, b: float = 3.0, name: str | None = None):
        super().__init__(name)
        if flips < 1 or a <= 0 or b <= 0:
            raise ValueError(f"flips ≥ 1 and a, b > 0 needed, got {flips}, {a}, {b}")
        self.config = BetaBernoulliConfig(flips=flips, a=a, b=b, name=self.name)
        self.register_buffer("prior", torch.tensor([a, b]))
        self.encoder = nn.Linear(1, 2)  # heads / flips → Beta concentrations (through softplus)

    def model(self, x=None, num_data=None):
        pyro.module(self.name, self)
        with pvae.data_plate(x, num_data):
            theta = pyro.sample("theta", dist.Beta(self.prior[0], self.prior[1]))
            probs = theta.unsqueeze(-1).expand(*theta.shape, self.config.flips)
            pyro.sample("x", dist.Bernoulli(probs).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        pyro.module(self.name, self)
        with pvae.data_plate(x, num_data):
            concentrations = softplus(self.encoder(x.mean(-1, keepdim=True))) + 1e-3
            pyro.sample("theta", dist.Beta(concentrations[..., 0], concentrations[..., 1]))

    def log_marginal(self, x):
        heads = x.sum(-1)
        a, b, flips = self.prior[0], self.prior[1], self.config.flips

        def log_beta(p, q):
            return torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)

        return log_beta(a + heads, b + flips - heads) - log_beta(a, b)

    def sample(self, n, generator=None):
        theta = torch.distributions.Beta(self.prior[0], self.prior[1]).sample((n,))
        return torch.bernoulli(theta.unsqueeze(-1).expand(n, self.config.flips), generator=generator)


# ---- its command-line face ------------------------------------------------------------------------------
def _add_arguments(parser):
    parser.add_argument("--flips", type=positive_int, default=16)
    parser.add_argument("--num-train", type=positive_int, default=512)


def _draw(count, flips, seed):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.distributions.Beta(2.0, 3.0).sample((count,))
    return torch.bernoulli(theta.unsqueeze(-1).expand(count, flips).contiguous(), generator=generator)


def _data(args, device):
    from pvae.data import BatchLoader

    train_x = _draw(args.num_train, args.flips, args.seed).to(device)
    test_x = _draw(200, args.flips, args.seed + 1).to(device)
    loader = BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed)
    return RunData(loader, BatchLoader(test_x, batch_size=200, shuffle=False), {"flips": args.flips}, test_x)


def _evaluate(args, family, checkpoint):
    from pvae.inference import compare

    test_x = _draw(200, family.config.flips, 1)
    result = compare(family.model, family.guide, test_x, log_marginal=family.log_marginal, num_samples=200)
    payload = {
        "elbo": result.elbo / 200,
        "log_marginal": result.log_marginal / 200,
        "stderr": result.elbo_stderr,
    }
    return payload, f"ELBO {payload['elbo']:.3f}, exact log p(x) {payload['log_marginal']:.3f} per datum"


def _sample(args, family, checkpoint):
    from pvae.plots import save_image_grid

    flips = family.config.flips
    side = math.isqrt(flips)
    draws = family.sample(args.num).reshape(args.num, 1, side, flips // side)
    return save_image_grid(draws, args.out, nrow=args.nrow)


register_commands(
    "test-beta-bernoulli",
    FamilyCommands(
        help="Beta–Bernoulli coins (defined in a test)",
        add_arguments=_add_arguments,
        data=_data,
        config=lambda args, data: {"flips": args.flips},
        objectives=("elbo", "meanfield"),
        evaluate=_evaluate,
        sample=_sample,
    ),
)


def test_a_family_defined_outside_pvae_trains_saves_loads_evaluates_and_samples(tmp_path, capsys):
    out = tmp_path / "coins"
    argv = ["train", "test-beta-bernoulli", "--epochs", "15", "--batch-size", "64", "--lr", "0.05"]
    assert cli.main([*argv, "--objective", "meanfield", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "test-beta-bernoulli" and summary["epochs"] == 15
    history = json.loads((out / "history.json").read_text())
    assert history["objective"] == "meanfield" and len(history["train_elbo"]) == 15
    assert history["train_elbo"][-1] > history["train_elbo"][0]  # training improved the bound

    family = pvae.load(out / "checkpoint.pt")
    assert isinstance(family, BetaBernoulli) and family.config.flips == 16

    assert cli.main(["evaluate", str(out / "checkpoint.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # a lower bound on the exact evidence (up to Monte Carlo error), and far closer to it than the same
    # pair before training: the command evaluated the trained weights
    gap = result["log_marginal"] - result["elbo"]
    untrained, _ = _evaluate(None, BetaBernoulli(), None)
    assert -3 * result["stderr"] / 200 < gap < 0.5 * (untrained["log_marginal"] - untrained["elbo"]), result

    picture = tmp_path / "coins.png"
    assert cli.main(["sample", str(out / "checkpoint.pt"), "-n", "16", "--out", str(picture)]) == 0
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(picture)[..., :3])  # (H, W, RGB) in [0, 1]
    assert {0.0, 1.0} <= set(pixels.unique().tolist())  # heads and tails both drawn

    # the registry is what the command line reads: the family's own flags are on its sub-command only
    assert cli.main(["train", "vae", "--flips", "4"]) == 2
    assert "unrecognized arguments: --flips" in capsys.readouterr().err


def test_prior_predictive_of_the_test_family_through_predictive():
    family = BetaBernoulli(flips=8)
    draws = pyro.infer.Predictive(family.model, num_samples=3)(None, num_data=5)
    assert draws["x"].shape == (3, 5, 8) and draws["theta"].shape == (3, 5)
    assert set(draws["x"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ["", "Has Caps", "x" * 65, 3])
def test_register_family_refuses_bad_names(name):
    with pytest.raises(ValueError, match="registered name must match"):
        pvae.register_family(name)


def test_register_family_refuses_a_constructor_that_drifted_from_its_config():
    @dataclass
    class Config:
        width: int = 3
        name: str | None = None

    class Drifted(pvae.Family):
        config_class = Config

        def __init__(self, width: int = 3, depth: int = 2, name: str | None = None):
            super().__init__(name)

    with pytest.raises(TypeError, match=r"takes \['depth'\], which are not in its config Config"):
        pvae.register_family("test-drifted")(Drifted)

    class Missing(pvae.Family):
        config_class = Config

        def __init__(self, name: str | None = None):
            super().__init__(name)

    with pytest.raises(TypeError, match=r"lacks the config fields \['width'\]"):
        pvae.register_family("test-missing")(Missing)

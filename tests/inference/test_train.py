"""train(): nats per datum, exact resume after an interruption mid-epoch, NaN handling, hooks, loaders."""

import json
import math
import os
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pvae.checkpoint import CheckpointError, load_checkpoint
from pvae.data import BatchLoader
from pvae.family import Family, register_family
from pvae.inference import History, SVIStep, make_elbo, train
from pvae.inference.train import scheduled_lr
from pvae.models.vae import VAE


@dataclass
class TinyConfig:
    dim: int = 6
    name: str | None = None


@register_family("test-tiny")
class Tiny(Family):
    """z ~ N(0, I₂), x | z ~ N(decoder(z)·gain, σ²) with σ a constrained free Pyro param; Gaussian guide."""

    config_class = TinyConfig

    def __init__(self, dim: int = 6, name: str | None = None):
        super().__init__(name)
        self.config = TinyConfig(dim, self.name)
        self.decoder = nn.Linear(2, dim)
        self.encoder = nn.Linear(dim, 4)
        self.gain = 1.0  # set to NaN to poison the loss
        self.steps_after = 0

    def model(self, x):
        pyro.module(self.name, self)
        sigma = pyro.param(f"{self.name}_sigma", lambda: x.new_tensor(0.7), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z) * self.gain, sigma).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def after_step(self):
        self.steps_after += 1


@register_family("test-tiny-meanfield")
class TinyMeanField(Tiny):
    """Trains its own program, the analytic-KL ELBO, whatever the objective asked for, and says so."""

    programs = []

    def svi_program(self, objective):
        TinyMeanField.programs.append(objective)
        return self.model, self.guide, TraceMeanField_ELBO(), "meanfield"


@register_family("test-tiny-own-program")
class TinyOwnProgram(Tiny):
    """Trains the objective asked for through a program of its own (as a diffusion model does)."""

    def svi_program(self, objective):
        if objective == "broken":
            return self.model, self.guide
        return self.model, self.guide, make_elbo(objective, num_particles=2)


def _data(n=40, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=generator)


def _loader(seed=0, n=40, batch_size=8, shuffle=True):
    return BatchLoader(_data(n), batch_size=batch_size, binarize=None, seed=seed, shuffle=shuffle)


def _test_loader():
    return _loader(seed=9, shuffle=False)


class Interrupting:
    """Wraps a loader and raises in a given epoch after some batches (a run killed mid-epoch)."""

    def __init__(self, loader, epoch, after):
        self.loader, self.epoch, self.after, self.calls = loader, epoch, after, 0

    @property
    def generator(self):
        return self.loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.calls += 1
        for index, batch in enumerate(self.loader):
            if self.calls == self.epoch and index == self.after:
                raise KeyboardInterrupt("killed")
            yield batch


RESUME_CASES = [("eager", None), ("trace", None), ("eager", 1e-4), ("trace", 1e-4)]


@pytest.mark.parametrize(
    "engine, lr_end", RESUME_CASES, ids=[f"{e}-{'decay' if d else 'constant'}" for e, d in RESUME_CASES]
)
def test_a_run_interrupted_mid_epoch_and_resumed_ends_with_the_same_parameters(tmp_path, engine, lr_end):
    torch.manual_seed(123)
    full = Tiny(name="uninterrupted")
    history = train(
        full,
        _loader(),
        _test_loader(),
        epochs=3,
        seed=1,
        checkpoint=tmp_path / "a.pt",
        engine=engine,
        lr=1e-2,
        lr_end=lr_end,
    )

    path = tmp_path / "b.pt"
    torch.manual_seed(123)  # the same initial weights
    first = Tiny(name="first_try")
    with pytest.raises(KeyboardInterrupt):
        train(
            first,
            Interrupting(_loader(), epoch=3, after=2),
            _test_loader(),
            epochs=3,
            seed=1,
            checkpoint=path,
            engine=engine,
            lr=1e-2,
            lr_end=lr_end,
        )
    saved = load_checkpoint(path)
    assert saved["epoch"] == 2 and saved["optimizer"]["num_steps"] == 10  # 5 batches per epoch
    expected_lr = 1e-2 if lr_end is None else scheduled_lr(1e-2, lr_end, 9, 15)  # that of the 10th step
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    resumed = Tiny(name="second_try")  # a fresh process would rebuild it: new object, new name, new init
    again = train(
        resumed,
        _loader(seed=5),
        _test_loader(),
        epochs=3,
        seed=77,
        checkpoint=path,
        resume=True,
        engine=engine,
        lr=1e-2,
        lr_end=lr_end,
    )
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    store = pyro.get_param_store()
    assert torch.equal(store["uninterrupted_sigma"], store["second_try_sigma"])
    assert again.train_elbo == history.train_elbo and again.test_elbo == history.test_elbo
    assert again.step_losses == history.step_losses
    final = load_checkpoint(path)
    assert final["epoch"] == 3 and final["optimizer"]["num_steps"] == 15
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_end or 1e-2, rel=1e-12)
    assert final["train_config"]["lr_end"] == lr_end


def test_the_learning_rate_decays_geometrically_from_lr_to_lr_end(monkeypatch):
    rates = [scheduled_lr(1e-2, 1e-4, step, 5) for step in range(5)]
    assert rates[0] == 1e-2 and rates[-1] == pytest.approx(1e-4, rel=1e-12)
    ratios = [b / a for a, b in zip(rates, rates[1:])]
    assert ratios == pytest.approx([0.1**0.5] * 4, rel=1e-12)  # a constant factor per step
    assert scheduled_lr(1e-2, 1e-4, 9, 5) == pytest.approx(1e-4)  # past the end: lr_end
    assert scheduled_lr(1e-2, None, 3, 5) == 1e-2 and scheduled_lr(1e-2, 1e-4, 0, 1) == 1e-2

    seen = []

    class Recording(Tiny):
        def after_step(self):  # the rate the optimizer has just used
            seen.append(self.step.optimizer.param_groups[0]["lr"])

    family = Recording()
    original = SVIStep.__init__

    def remember(self, *args, **kwargs):  # let the family see the step that train() builds
        original(self, *args, **kwargs)
        family.step = self

    monkeypatch.setattr(SVIStep, "__init__", remember)
    train(family, _loader(), epochs=2, lr=1e-2, lr_end=1e-3, seed=0, progress=False)
    assert seen == pytest.approx([scheduled_lr(1e-2, 1e-3, k, 10) for k in range(10)], rel=1e-12)


def test_history_is_in_nats_per_datum_and_json_serializable(tmp_path):
    family = Tiny()
    seen = []
    history = train(
        family,
        _loader(n=44, batch_size=8),
        _loader(seed=3),
        epochs=2,
        seed=0,
        progress=False,
        callback=lambda epoch, record: seen.append((epoch, record.epochs)),
    )
    assert seen == [(1, 1), (2, 2)]
    assert history.epochs == 2 and len(history.step_losses) == 2 * 6  # 5 full batches and one of 4
    sizes = [8] * 5 + [4]
    for epoch in range(2):
        losses = history.step_losses[6 * epoch : 6 * (epoch + 1)]
        expected = -sum(loss * size for loss, size in zip(losses, sizes)) / 44
        assert history.train_elbo[epoch] == pytest.approx(expected, rel=1e-9)
    assert len(history.test_elbo) == 2 and all(math.isfinite(value) for value in history.test_elbo)
    assert all(seconds > 0 for seconds in history.epoch_seconds + history.eval_seconds)
    restored = History.from_dict(json.loads(json.dumps(history.to_dict())))
    assert restored == history
    assert family.steps_after == 12  # after_step ran after every optimizer step


def test_training_improves_the_test_elbo_of_a_vae():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.rand(3, 30, generator=generator) > 0.5
    data = prototypes[torch.randint(0, 3, (300,), generator=generator)].float()
    loader = BatchLoader(data, batch_size=32, seed=0)
    test = BatchLoader(data[:64], batch_size=64, shuffle=False)
    history = train(VAE(x_dim=30, z_dim=2, hidden_dim=32), loader, test, epochs=4, lr=1e-2, seed=0)
    assert history.test_elbo[-1] > history.test_elbo[0] + 5


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    family = Tiny()
    train(family, _loader(), epochs=1, seed=0, checkpoint=path)
    before = path.read_bytes()

    class Poisoning:
        generator = None

        def __iter__(self):
            for index, batch in enumerate(_loader()):
                if index == 2:
                    family.gain = 1e30  # finite parameters, an infinite loss: validation passes
                yield batch

    with pytest.raises(
        FloatingPointError,
        match=r"diverged at epoch 2, step 3 of this epoch \(the loss is nan\).*not updated.*"
        r"last good checkpoint .*epoch 1. is kept",
    ):
        train(family, Poisoning(), epochs=3, checkpoint=path, resume=True)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [name for name in os.listdir(tmp_path)] == ["run.pt"]  # no temporary files left behind


def test_svi_program_and_after_step_hooks_are_used_and_the_history_names_what_trained(tmp_path):
    TinyMeanField.programs.clear()
    torch.manual_seed(5)
    family = TinyMeanField()
    history = train(
        family, _loader(), epochs=1, objective="iwae", num_particles=4, seed=0, checkpoint=tmp_path / "a.pt"
    )
    assert TinyMeanField.programs == ["iwae"]  # asked for IWAE, it trained its own analytic-KL ELBO
    assert family.steps_after == 5 and history.objective == "meanfield"
    assert load_checkpoint(tmp_path / "a.pt")["train_config"]["objective"] == "meanfield"
    torch.manual_seed(5)  # the same initial weights, trained on the objective the history names
    reference = train(Tiny(), _loader(), epochs=1, objective="meanfield", seed=0)
    assert history.step_losses == reference.step_losses

    honest = train(TinyOwnProgram(), _loader(), epochs=1, objective="iwae", seed=0)
    assert honest.objective == "iwae"  # (model, guide, elbo): the program trains what was asked for
    with pytest.raises(ValueError, match=r"svi_program must return \(model, guide, elbo\)"):
        train(TinyOwnProgram(), _loader(), epochs=1, objective="broken")


# jit=True is Pyro's JitTrace_ELBO, built on torch.jit.trace, which torch now marks as deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_objectives_jit_and_plain_dataloaders():
    dataset = torch.utils.data.TensorDataset(_data(24))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)  # yields [x]
    for kwargs in ({"objective": "meanfield"}, {"objective": "iwae", "num_particles": 3}, {"jit": True}):
        history = train(Tiny(), loader, loader, epochs=1, seed=0, **kwargs)
        assert math.isfinite(history.train_elbo[0]) and math.isfinite(history.test_elbo[0])
    history = train(Tiny(), [_data(8), _data(8, seed=1)], epochs=1, objective=Trace_ELBO())  # bare tensors
    assert history.objective == "Trace_ELBO" and len(history.step_losses) == 2


def test_resume_without_a_checkpoint_file_starts_afresh(tmp_path):
    history = train(Tiny(), _loader(), epochs=1, checkpoint=tmp_path / "new.pt", resume=True, seed=0)
    assert history.epochs == 1 and (tmp_path / "new.pt").exists()


def test_bad_arguments_raise(tmp_path):
    family = Tiny()
    with pytest.raises(ValueError, match="epochs"):
        train(family, _loader(), epochs=0)
    with pytest.raises(ValueError, match="checkpoint"):
        train(family, _loader(), epochs=1, resume=True)
    with pytest.raises(ValueError, match="engine"):
        train(family, _loader(), epochs=1, engine="turbo")
    with pytest.raises(ValueError, match="jit"):
        train(family, _loader(), epochs=1, jit=True, engine="trace")
    with pytest.raises(ValueError, match="objective"):
        train(family, _loader(), epochs=1, objective="kl")
    with pytest.raises(ValueError, match="tensors"):
        train(family, [["not", "tensors"]], epochs=1)
    with pytest.raises(ValueError, match="lr_end"):
        train(family, _loader(), epochs=1, lr_end=0.0)
    with pytest.raises(ValueError, match="lr_end"):
        train(family, iter([_data(8)]), epochs=1, lr_end=1e-4)  # no len(): the schedule has no length
    other = VAE(x_dim=6, z_dim=2, hidden_dim=8)
    train(other, [torch.ones(4, 6)], epochs=1, checkpoint=tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match=r"family.name: the checkpoint holds a 'vae' family"):
        train(family, _loader(), epochs=2, checkpoint=tmp_path / "vae.pt", resume=True)
    with pytest.raises(ValueError, match="no batches"):
        train(Tiny(), [], epochs=1)


def test_an_existing_checkpoint_is_never_replaced_unless_asked(tmp_path):
    path = tmp_path / "run.pt"
    train(Tiny(), _loader(), epochs=1, checkpoint=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"already exists: pass resume=True .* or overwrite=True"):
        train(Tiny(), _loader(), epochs=1, checkpoint=path, progress=False)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="contradict"):
        train(Tiny(), _loader(), epochs=1, checkpoint=path, resume=True, overwrite=True)
    train(Tiny(), _loader(seed=3), epochs=1, checkpoint=path, overwrite=True, progress=False)
    assert path.read_bytes() != before


def test_resuming_with_other_settings_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "run.pt"
    common = {"checkpoint": path, "progress": False, "metadata": {"batch_size": 8}}
    train(Tiny(), _loader(), epochs=1, lr=1e-2, **common)
    with pytest.raises(
        ValueError, match=r"other settings .*objective: saved 'elbo', now 'meanfield'; lr: saved"
    ):
        train(Tiny(), _loader(), epochs=2, lr=1e-3, objective="meanfield", resume=True, **common)
    changed = common | {"metadata": {"batch_size": 4}}
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        train(Tiny(), _loader(), epochs=2, lr=1e-2, resume=True, **changed)
    with pytest.raises(
        ValueError, match=r"nothing left to train: .* 1 epoch\(s\) and the run asks for 1 in all"
    ):
        train(Tiny(), _loader(), epochs=1, lr=1e-2, resume=True, **common)
    history = train(
        Tiny(), _loader(), epochs=2, lr=1e-2, objective="meanfield", resume=True, allow_changes=True, **common
    )
    assert history.objective == "meanfield" and history.epochs == 2
    assert history.changes == [{"epoch": 2, "objective": ["elbo", "meanfield"]}]
    saved = load_checkpoint(path)
    assert (
        saved["train_config"]["objective"] == "meanfield" and saved["history"]["changes"] == history.changes
    )

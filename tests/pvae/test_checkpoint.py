"""Checkpoints: atomic writes, weights-only loading, pvae.load, RNG states, and clear errors."""

import os
import random
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch import nn

import pvae
from pvae import checkpoint as ckpt
from pvae.family import Family, register_family
from pvae.inference import log_evidence
from pvae.models.vae import VAE


@dataclass
class ScaledConfig:
    dim: int = 3
    name: str | None = None


@register_family("test-scaled")
class Scaled(Family):
    """A family with a constrained Pyro param outside its modules (stored under its prefix)."""

    config_class = ScaledConfig

    def __init__(self, dim: int = 3, name: str | None = None):
        super().__init__(name)
        self.config = ScaledConfig(dim, self.name)
        self.loc = nn.Linear(1, dim)

    def scale(self, like):
        return pyro.param(
            f"{self.name}.scale", lambda: like.new_full((3,), 0.5), constraint=constraints.positive
        )

    def model(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc.bias, self.scale(x)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(self.name, self)


def test_pvae_load_rebuilds_the_family_on_cpu_under_a_fresh_name(tmp_path):
    vae = VAE(x_dim=12, z_dim=2, hidden_dim=8)
    history = {"train_elbo": [1.0, 2.0, 3.0], "epoch_seconds": [0.1] * 3}
    path = ckpt.save_checkpoint(tmp_path / "sub" / "vae.pt", vae, epoch=3, history=history)
    loaded = pvae.load(path)
    assert type(loaded) is VAE and loaded.name != vae.name and not loaded.training
    assert loaded.constructor_kwargs() | {"name": None} == vae.constructor_kwargs() | {"name": None}
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value) and loaded.state_dict()[key].device.type == "cpu"
    x = torch.bernoulli(torch.full((4, 12), 0.3))
    assert torch.isfinite(log_evidence(loaded.model, loaded.guide, x, num_samples=5)).all()
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 3 and raw["family"]["name"] == "vae"


def test_free_pyro_params_travel_with_their_constraint(tmp_path):
    family = Scaled()
    x = torch.randn(5, 3)
    family.model(x)
    pyro.get_param_store()[f"{family.name}.scale"] = torch.tensor([0.3, 1.5, 4.0])
    path = ckpt.save_checkpoint(tmp_path / "scaled.pt", family)
    loaded = pvae.load(path)
    store = pyro.get_param_store()
    restored = store[f"{loaded.name}.scale"]
    assert torch.equal(restored.unconstrained(), store[f"{family.name}.scale"].unconstrained())
    assert store._constraints[f"{loaded.name}.scale"] is constraints.positive
    torch.testing.assert_close(restored, torch.tensor([0.3, 1.5, 4.0]))


def test_rng_states_round_trip():
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2), np.random.randn(), random.gauss(0, 1))
    ckpt.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2), np.random.randn(), random.gauss(0, 1))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    assert first[3] == second[3] and first[4] == second[4]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    vae = VAE(x_dim=12, z_dim=2, hidden_dim=8)
    path = ckpt.save_checkpoint(tmp_path / "vae.pt", vae, epoch=1)
    before = open(path, "rb").read()

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, vae, epoch=2)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["vae.pt"]


def test_missing_or_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pvae.load(tmp_path / "nothing.pt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a pvae checkpoint"):
        pvae.load(text)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    with pytest.raises(ValueError, match="not a pvae checkpoint"):
        pvae.load(foreign)
    vae = VAE(x_dim=12, z_dim=2, hidden_dim=8)
    path = ckpt.save_checkpoint(tmp_path / "vae.pt", vae)
    payload = torch.load(path, weights_only=True)
    payload["family"]["name"] = "nowhere"
    torch.save(payload, path)
    with pytest.raises(ckpt.CheckpointError, match=r"family\.name: unknown family 'nowhere'"):
        pvae.load(path)
    with pytest.raises(ValueError, match="device"):
        pvae.load(path, device="tpu")


def test_restoring_into_another_architecture_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "vae.pt", VAE(x_dim=12, z_dim=2, hidden_dim=8))
    with pytest.raises(ValueError, match="built with"):
        ckpt.restore_family(VAE(x_dim=12, z_dim=3, hidden_dim=8), ckpt.load_checkpoint(path))


def test_unregistered_families_cannot_be_checkpointed(tmp_path):
    class Local(Scaled):
        pass

    with pytest.raises(ValueError, match="registered for another class"):
        ckpt.save_checkpoint(tmp_path / "x.pt", Local())

    class Plain(Family):
        pass

    with pytest.raises(ValueError, match="not a registered pvae family"):
        ckpt.save_checkpoint(tmp_path / "x.pt", Plain())


def test_checkpoints_get_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path / "vae.pt", VAE(x_dim=12, z_dim=2, hidden_dim=8))
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_built_in_family_loads_in_a_fresh_interpreter_that_never_imported_it(tmp_path):
    import subprocess
    import sys

    path = ckpt.save_checkpoint(tmp_path / "vae.pt", VAE(x_dim=12, z_dim=2, hidden_dim=8))
    code = f"import pvae, sys; family = pvae.load({str(path)!r}); print(type(family).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "VAE", result.stderr

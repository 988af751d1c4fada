import pytest
import torch

from pvae.utils import (
    check_finite,
    check_positive,
    resolve_device,
    seed_everything,
    torch_threads,
    unique_name,
)


def test_seed_everything_makes_draws_repeat():
    seed_everything(5)
    first = torch.randn(3)
    generator = seed_everything(5)
    assert torch.equal(first, torch.randn(3))
    assert torch.equal(torch.rand(2, generator=generator), torch.rand(2, generator=seed_everything(5)))
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        with torch_threads(0):
            pass


def test_checks_name_the_argument():
    with pytest.raises(ValueError, match="rate"):
        check_positive("rate", 0.0)
    with pytest.raises(ValueError, match="data"):
        check_finite("data", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating"):
        check_finite("data", torch.tensor([1, 2]))
    assert check_positive("scale", 2) == 2.0


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_unique_names_differ():
    assert unique_name("vae") != unique_name("vae")

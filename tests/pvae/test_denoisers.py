import math

import pytest
import torch

from pvae.denoisers import MLPDenoiser, UNetDenoiser, default_denoiser, sinusoidal_embedding


def _randomize_output(net):
    """Networks start with a zero output layer (ε_θ = 0); give it weights so outputs depend on inputs."""
    last = net.output
    torch.nn.init.normal_(last.weight, std=0.1)
    torch.nn.init.normal_(last.bias, std=0.1)
    return net


def test_sinusoidal_embedding_values():
    t = torch.tensor([0.0, 1.0, 250.0], dtype=torch.float64)
    emb = sinusoidal_embedding(t, 8)
    frequencies = torch.tensor([10000 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    expected = torch.cat([torch.sin(t[:, None] * frequencies), torch.cos(t[:, None] * frequencies)], -1)
    assert emb.shape == (3, 8) and emb.dtype == torch.float64
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(t, 7)


def test_fresh_networks_predict_zero_noise():
    x = torch.randn(3, 2)
    assert torch.equal(MLPDenoiser(2, 10)(x, 4), torch.zeros_like(x))
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(UNetDenoiser(timesteps=10, channels=(8, 16))(images, 4), torch.zeros_like(images))


def test_mlp_leading_batch_dims_and_time_broadcast():
    net = _randomize_output(MLPDenoiser(3, timesteps=50, hidden_dim=16, num_blocks=2))
    x = torch.randn(4, 5, 3)
    t = torch.randint(1, 51, (4, 1))
    out = net(x, t)  # t broadcasts over the 5 columns
    assert out.shape == x.shape
    for i in range(4):
        torch.testing.assert_close(out[i], net(x[i], t[i].expand(5)))
    # a scalar time equals a full tensor of that time
    torch.testing.assert_close(net(x, 7), net(x, torch.full((4, 5), 7)))
    # the output depends on t
    assert not torch.allclose(net(x, 1), net(x, 50))


def test_integer_timesteps_equal_float_ones():
    """The diffusion chains pass timesteps as LongTensors (one per batch, or per datum): the same outputs."""
    net = _randomize_output(MLPDenoiser(2, timesteps=20, hidden_dim=16, num_blocks=1))
    x = torch.randn(3, 4, 2)
    per_batch = torch.tensor(7)  # 0-d
    per_row = torch.tensor([[1], [5], [20]])  # (3, 1): a timestep per row of the (3, 4) batch
    torch.testing.assert_close(net(x, per_batch), net(x, 7.0), rtol=0, atol=0)
    torch.testing.assert_close(net(x, per_row), net(x, per_row.double()), rtol=0, atol=0)
    unet = _randomize_output(UNetDenoiser((1, 8, 8), timesteps=20, channels=(8,), time_dim=8))
    images = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(unet(images, torch.tensor([3, 9])), unet(images, torch.tensor([3.0, 9.0])))


def test_unet_leading_batch_dims_and_shapes():
    net = _randomize_output(UNetDenoiser((1, 28, 28), timesteps=20, channels=(8, 16), time_dim=16))
    x = torch.randn(2, 3, 1, 28, 28)
    t = torch.tensor([[1], [20]])  # (2, 1) broadcasts over the 3 images per row
    out = net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out[1], net(x[1], torch.full((3,), 20)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net(x[0], 1), net(x[0], 20))
    # images are processed independently (GroupNorm is per image); a batch of 1 and of 3 may take different
    # fp32 convolution kernels, so the comparison allows float32 rounding (~1e-6 absolute) a margin
    torch.testing.assert_close(net(x[0, :1], 5), net(x[0], 5)[:1], rtol=1e-4, atol=1e-5)


def test_unet_gradients_reach_every_parameter():
    net = UNetDenoiser((1, 8, 8), timesteps=10, channels=(8, 16), time_dim=16)
    _randomize_output(net)
    net(torch.randn(4, 1, 8, 8), torch.tensor([1, 3, 5, 10])).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_dtypes_follow_the_module(dtype):
    mlp_net = _randomize_output(MLPDenoiser(2, 10)).to(dtype)
    x = torch.randn(5, 2, dtype=dtype)
    assert mlp_net(x, 3).dtype == dtype
    unet = UNetDenoiser((1, 8, 8), timesteps=10, channels=(8,), time_dim=8).to(dtype)
    assert unet(torch.randn(2, 1, 8, 8, dtype=dtype), 3).dtype == dtype
    # data of another float dtype is computed in the module's dtype and returned in the data's
    assert mlp_net(x.to(torch.float16 if dtype == torch.float64 else torch.float64), 3).dtype != dtype


def test_default_denoiser_and_bad_input():
    assert isinstance(default_denoiser((2,), 100), MLPDenoiser)
    assert isinstance(default_denoiser((1, 28, 28), 100), UNetDenoiser)
    with pytest.raises(ValueError, match="no default denoiser"):
        default_denoiser((4, 4), 10)
    with pytest.raises(ValueError, match="shape"):
        MLPDenoiser(2, 10)(torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="shape"):
        UNetDenoiser(timesteps=10, channels=(8,))(torch.randn(3, 28, 28), 1)
    with pytest.raises(ValueError, match="broadcast"):
        MLPDenoiser(2, 10)(torch.randn(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="divisible"):
        UNetDenoiser((1, 28, 28), channels=(8, 16, 32))
    with pytest.raises(ValueError, match="timesteps"):
        MLPDenoiser(2, 0)


def test_time_scaling_makes_embeddings_comparable_across_T():
    # t = T/2 of a 10-step chain and of a 1000-step chain land on the same embedding input (500)
    small, large = MLPDenoiser(2, 10), MLPDenoiser(2, 1000)
    assert math.isclose(5 * small.time_embedding.scale, 500 * large.time_embedding.scale)

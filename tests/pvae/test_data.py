import gzip
import math

import numpy as np
import pytest
import torch

import pvae.data
from pvae.data import (
    BatchLoader,
    ImageData,
    check_model_space,
    from_model_space,
    load_images,
    mnist5k_path,
    to_model_space,
    two_moons,
)


@pytest.fixture(scope="module")
def table():
    with gzip.open(mnist5k_path(), "rt") as handle:
        return np.loadtxt(handle, delimiter=",", dtype=np.int64)  # (5000, 785), label last


@pytest.fixture(scope="module")
def splits():
    return load_images("mnist5k", "train"), load_images("mnist5k", "test")


# ---- mnist5k ---------------------------------------------------------------------------------------------
def test_mnist5k_split_is_stratified_fixed_and_disjoint(table, splits):
    train, test = splits
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    pixels, labels = table[:, :-1], table[:, -1]
    for digit in range(10):
        rows = pixels[labels == digit]  # file order within the class
        assert np.array_equal(train.pixels[train.labels == digit].reshape(-1, 784).numpy(), rows[:400])
        assert np.array_equal(test.pixels[test.labels == digit].reshape(-1, 784).numpy(), rows[400:])
    # Disjoint as images, not only as rows: no test digit also appears in the training split.
    train_images = {row.tobytes() for row in train.pixels.reshape(-1, 784).numpy()}
    assert not any(row.tobytes() in train_images for row in test.pixels.reshape(-1, 784).numpy())


def test_mnist5k_pixels_are_real_digits(splits):
    for images in splits:
        assert images.pixels.dtype == torch.uint8 and images.pixels.shape[1:] == (28, 28)
        assert images.pixels.min() == 0 and images.pixels.max() == 255
        ink = images.pixels.reshape(len(images), -1).float().sum(1)
        assert (ink > 0).all()  # every image has a stroke
        on = (images.pixels > 0).float().mean().item()
        assert 0.12 < on < 0.30  # MNIST digits cover roughly a fifth of the frame
        ink_per_class = torch.stack([ink[images.labels == digit].mean() for digit in range(10)])
        assert ink_per_class.argmin() == 1  # "1" is the thinnest digit
        assert ink_per_class[1] < 0.6 * ink_per_class[0]
        border = torch.cat([images.pixels[:, :2].flatten(), images.pixels[:, :, :2].flatten()])
        assert (border == 0).float().mean() > 0.99  # centred in the 28×28 frame, as MNIST is


def test_flat_gives_grey_levels(splits):
    train, _ = splits
    flat = train.flat(torch.float64)
    assert flat.shape == (4000, 784) and flat.dtype == torch.float64
    torch.testing.assert_close(flat * 255, train.pixels.reshape(4000, -1).double())


@pytest.mark.parametrize(
    "kwargs,match",
    [({"name": "cifar"}, "dataset"), ({"split": "validation"}, "split")],
    ids=["name", "split"],
)
def test_load_images_rejects_unknown_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_images(**kwargs)


# ---- binarization and batches ----------------------------------------------------------------------------
def _epoch(loader):
    batches, labels = zip(*loader)
    return torch.cat(batches), torch.cat(labels)


def _bernoulli_z(binary, probabilities):
    """z-score of Σ(b − p) for independent Bernoulli(p) draws."""
    return ((binary - probabilities).sum() / (probabilities * (1 - probabilities)).sum().sqrt()).item()


def test_dynamic_binarization_changes_between_epochs(splits):
    grey = splits[1].flat()
    loader = BatchLoader(grey, torch.arange(1000), batch_size=128, shuffle=False, binarize="dynamic", seed=0)
    first, _ = _epoch(loader)
    second, _ = _epoch(loader)
    for epoch in (first, second):
        assert ((epoch == 0) | (epoch == 1)).all()
        assert abs(_bernoulli_z(epoch, grey)) < 4.5  # E[b] = pixel / 255
    changed = (first != second).float().mean().item()
    expected = (2 * grey * (1 - grey)).mean().item()  # P(two independent draws differ)
    assert changed == pytest.approx(expected, rel=0.05)


def test_dynamic_binarization_draws_only_grey_pixels_and_keeps_black_and_white():
    """Pixels at 0 and 1 are their own binarization; the grey ones are Bernoulli draws at their level,
    fresh every epoch."""
    data = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9]).repeat(400, 1)
    loader = BatchLoader(data, batch_size=64, shuffle=False, binarize="dynamic", seed=2)
    epochs = torch.stack([torch.cat([batch for batch, _ in loader]) for _ in range(20)])  # (20, 400, 5)
    assert (epochs[..., 0] == 0).all() and (epochs[..., 1] == 1).all()
    grey = epochs[..., 2:].reshape(-1, 3)
    for column, level in zip(grey.T, (0.25, 0.5, 0.9)):
        z = (column.sum() - level * column.numel()) / math.sqrt(column.numel() * level * (1 - level))
        assert abs(z.item()) < 4.5
    # the same datum's draws in two epochs agree no more often than independent draws would
    same = (epochs[0, :, 3] == epochs[1, :, 3]).float().mean().item()
    assert abs(same - 0.5) < 4.5 * math.sqrt(0.25 / 400)
    assert not torch.equal(epochs[0], epochs[1])


def test_static_binarization_is_fixed(splits):
    grey = splits[1].flat()
    loader = BatchLoader(grey, torch.arange(1000), batch_size=100, shuffle=True, binarize="static", seed=0)
    first, order_first = _epoch(loader)
    second, order_second = _epoch(loader)
    assert not torch.equal(order_first, order_second)  # reshuffled …
    first, second = first[order_first.argsort()], second[order_second.argsort()]
    assert torch.equal(first, second)  # … but every image keeps its single binarization
    assert ((first == 0) | (first == 1)).all()
    assert abs(_bernoulli_z(first, grey)) < 4.5
    other_seed, order = _epoch(
        BatchLoader(grey, torch.arange(1000), batch_size=100, binarize="static", seed=1)
    )
    assert not torch.equal(other_seed[order.argsort()], first)


def test_batch_loader_is_reproducible_for_a_seed(splits):
    grey, labels = splits[1].flat(), splits[1].labels

    def run(seed, epochs=2):
        loader = BatchLoader(grey, labels, batch_size=64, binarize="dynamic", seed=seed)
        return [_epoch(loader) for _ in range(epochs)]

    same, again, other = run(3), run(3), run(4)
    for (x, y), (x_again, y_again) in zip(same, again):
        assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(same[0][1], other[0][1])


def test_batch_loader_resumes_from_its_generator_state(splits):
    grey = splits[1].flat()
    reference = BatchLoader(grey, batch_size=50, binarize="dynamic", seed=7)
    assert len([batch for batch, _ in reference]) == 20  # epoch 1
    state = reference.generator.get_state()
    expected = [batch for batch, _ in reference]  # epoch 2
    resumed = BatchLoader(grey, batch_size=50, binarize="dynamic", seed=123)
    resumed.generator.set_state(state)
    served = [batch for batch, _ in resumed]
    assert len(served) == 20 and all(torch.equal(a, b) for a, b in zip(expected, served))


def test_batch_loader_sizes_and_validation():
    data = torch.rand(10, 3)
    assert len(BatchLoader(data, batch_size=4)) == 3
    assert len(BatchLoader(data, batch_size=4, drop_last=True)) == 2
    sizes = [batch.shape[0] for batch, _ in BatchLoader(data, batch_size=4, shuffle=False)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(data, batch_size=0)
    with pytest.raises(ValueError, match="binarize"):
        BatchLoader(data, binarize="always")
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(data, torch.arange(9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BatchLoader(data * 2, binarize="dynamic")


@pytest.mark.parametrize("binarize", ["dynamic", "static", None])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_batch_loader_rejects_non_finite_data_before_binarizing(binarize, bad):
    """A NaN grey level used to be binarized into a silent 0 (NaN fails neither < 0 nor > 1)."""
    data = torch.rand(6, 4)
    data[2, 1] = bad
    data[4, 3] = bad
    with pytest.raises(ValueError, match="data must be finite; it has 2 NaN/inf entries"):
        BatchLoader(data, batch_size=3, binarize=binarize)


def test_batch_loader_rejects_empty_and_shapeless_data():
    with pytest.raises(ValueError, match=r"data is empty, shape \(0, 3\): a loader needs at least one datum"):
        BatchLoader(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"data must be a tensor of shape \(N, \.\.\.\)"):
        BatchLoader(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"data must be a tensor of shape \(N, \.\.\.\).*got list"):
        BatchLoader([[0.5, 0.5]])


def test_conversions_reject_non_finite_pixels():
    pixels = torch.tensor([0.0, math.nan, 255.0, math.inf])
    with pytest.raises(ValueError, match="pixels must be finite; it has 2 NaN/inf entries"):
        to_model_space(pixels)
    with pytest.raises(ValueError, match=r"pixels must be a torch\.Tensor"):
        to_model_space([0, 255])
    with pytest.raises(ValueError, match="pixels must be finite; it has 2 NaN/inf entries"):
        ImageData(pixels.reshape(1, 2, 2), torch.zeros(1)).flat()
    with pytest.raises(ValueError, match="x must be finite; it has 1 NaN/inf entry"):
        check_model_space("x", torch.tensor([-1.0, math.inf]))


def _fake_mnist5k(tmp_path, table) -> str:
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, table, delimiter=",", fmt="%g")
    return str(path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (math.nan, "dataset 'mnist5k' .* must be finite; it has 1 NaN/inf entry"),
        (300.0, "the pixels of dataset 'mnist5k' .* must be integer pixel levels 0..255; 1 of"),
        (0.5, "the pixels of dataset 'mnist5k' .* must be integer pixel levels 0..255; 1 of"),
    ],
    ids=["nan", "above-255", "between-levels"],
)
def test_load_images_rejects_a_corrupt_file(tmp_path, monkeypatch, corrupt, message):
    """NaN used to fail inside numpy without naming anything, and 300 used to wrap around to 44 silently."""
    table = np.zeros((100, 785))
    table[:, -1] = np.repeat(np.arange(10), 10)  # 10 per class, all of them train
    table[3, 7] = corrupt
    monkeypatch.setattr(pvae.data, "mnist5k_path", lambda: _fake_mnist5k(tmp_path, table))
    with pytest.raises(ValueError, match=message):
        load_images("mnist5k", "train")


# ---- model space -----------------------------------------------------------------------------------------
def test_model_space_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    for dtype in (torch.float32, torch.float64):
        x = to_model_space(pixels, dtype)
        assert x.dtype == dtype and x.min() == -1 and x.max() == 1
        assert torch.equal(from_model_space(x), pixels)
        check_model_space("x", x)
    noisy = to_model_space(pixels, torch.float64) + 0.4 / 127.5  # rounds back to the same level
    assert torch.equal(from_model_space(noisy.clamp(-1, 1)), pixels)


@pytest.mark.parametrize(
    "bad",
    [0.5 / 127.5 - 1.0, 0.3, 1.02, -1.5, math.nan],
    ids=["off-grid-low", "off-grid", "above", "below", "nan"],
)
def test_check_model_space_rejects_off_grid_values(bad):
    x = to_model_space(torch.tensor([0, 128, 255], dtype=torch.uint8), torch.float64)
    x[1] = bad
    with pytest.raises(ValueError, match="x must be"):
        check_model_space("x", x)


# ---- two moons -------------------------------------------------------------------------------------------
def test_two_moons():
    points = two_moons(500, noise=0.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert points.shape == (500, 2) and points.dtype == torch.float64
    again = two_moons(500, noise=0.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(points, again)
    assert points.mean(0).abs().max() < 0.2 and (points.std(0) - 1).abs().max() < 0.5
    with pytest.raises(ValueError, match="num_points"):
        two_moons(0)
    with pytest.raises(ValueError, match="noise"):
        two_moons(10, noise=-1.0)

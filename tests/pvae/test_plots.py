import math
import os

import matplotlib
import pytest
import torch
from matplotlib.image import imread

from pvae import plots
from pvae.models.vae import VAE


def _read(path):
    image = imread(path)  # (H, W, channels) floats in [0, 1]
    return torch.from_numpy(image[..., :3].copy())


def _pixels_of(picture, colour, tolerance=0.03):
    """How many pixels of an (H, W, 3) picture have the RGB ``colour`` (a matplotlib colour name or tuple)."""
    rgb = torch.tensor(matplotlib.colors.to_rgb(colour), dtype=picture.dtype)
    return int(((picture - rgb).abs().max(-1).values < tolerance).sum())


def _tile(image, row, col, size=28, padding=2):
    """The centre pixel (first channel) of tile (row, col) of a make_grid picture."""
    top = padding + row * (size + padding) + size // 2
    left = padding + col * (size + padding) + size // 2
    return image[top, left, 0].item()


def test_save_image_grid_layout_and_values(tmp_path):
    levels = torch.arange(10, dtype=torch.float32) / 9  # image i is uniformly grey at level i/9
    images = levels[:, None].expand(10, 784).clone()
    path = plots.save_image_grid(images, tmp_path / "grid.png", nrow=5)
    assert path == os.fspath(tmp_path / "grid.png")
    assert os.listdir(tmp_path) == ["grid.png"]  # written via a temporary file, nothing left behind
    picture = _read(path)
    assert picture.shape[:2] == (2 * 30 + 2, 5 * 30 + 2)
    for index in range(10):
        row, col = divmod(index, 5)  # row-major
        assert _tile(picture, row, col) == pytest.approx(index / 9, abs=1 / 255)


def test_save_image_grid_accepts_image_shapes_and_uint8(tmp_path):
    pixels = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    picture = _read(plots.save_image_grid(pixels, tmp_path / "a.png", nrow=3))
    assert _tile(picture, 0, 0) == 1.0
    plots.save_image_grid(torch.rand(4, 1, 28, 28), tmp_path / "b.png")
    with pytest.raises(ValueError, match="does not fit"):
        plots.save_image_grid(torch.rand(4, 100), tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plots.save_image_grid(torch.rand(4, 784), tmp_path / "grid.jpg")
    with pytest.raises(ValueError, match="finite"):
        plots.save_image_grid(torch.full((2, 784), math.nan), tmp_path / "d.png")


def test_reconstructions_sit_beneath_their_originals(tmp_path):
    originals = torch.ones(6, 784)  # white
    reconstructions = torch.zeros(6, 784)  # black
    picture = _read(plots.plot_reconstructions(originals, reconstructions, tmp_path / "r.png", per_row=4))
    assert picture.shape[:2] == (4 * 30 + 2, 4 * 30 + 2)  # rows: originals, reconstructions, originals, …
    for col in range(4):
        assert _tile(picture, 0, col) == 1.0
        assert _tile(picture, 1, col) == 0.0
    assert _tile(picture, 2, 1) == 1.0 and _tile(picture, 3, 1) == 0.0
    assert _tile(picture, 3, 3) == 1.0  # the last row pair is completed with blank tiles
    with pytest.raises(ValueError, match="differ"):
        plots.plot_reconstructions(originals, reconstructions[:5], tmp_path / "bad.png")


@pytest.mark.parametrize(
    "history, curves",
    [
        ([-300.0, -200.0, -150.0], 1),
        (torch.tensor([3.0, 2.0, 1.0]), 1),
        ({"train": [-200.0, -150.0, -120.0], "test": [None, -160.0, -130.0]}, 2),
        ({"epoch": [1, 2], "train": [-2.0, -1.0], "seconds": 3.5}, 1),
        (
            [
                {"epoch": 1, "train_elbo": -3.0, "test_elbo": -4.0},
                {"epoch": 2, "train_elbo": -2.0, "test_elbo": None},
            ],
            2,
        ),
    ],
    ids=["list", "tensor", "train-test", "with-epochs", "records"],
)
def test_loss_curve_accepts_histories(tmp_path, history, curves):
    path = plots.plot_loss_curve(history, tmp_path / "elbo.png", title="ELBO")
    picture = _read(path)
    assert picture.shape == (round(3.8 * 120), round(5.5 * 120), 3)  # the figure's size at 120 dpi
    assert os.listdir(tmp_path) == ["elbo.png"]
    # one line per curve, in matplotlib's colour cycle: blue, then orange
    assert _pixels_of(picture, "tab:blue") > 100
    assert (_pixels_of(picture, "tab:orange") > 30) == (curves == 2)  # (a test curve may be one point)


@pytest.mark.parametrize(
    "history", [{}, [], "abc", 3.0], ids=["empty-dict", "empty-list", "string", "number"]
)
def test_loss_curve_rejects_non_numeric_histories(tmp_path, history):
    with pytest.raises(ValueError, match="history"):
        plots.plot_loss_curve(history, tmp_path / "elbo.png")


def test_latent_projection_is_identity_in_2d_and_pca_above():
    z = torch.randn(50, 2, dtype=torch.float64)
    points, names, note = plots.latent_projection(z)
    assert torch.equal(points, z) and note == ""
    # Codes on a plane inside 5-D: the two principal components keep every distance and all the variance.
    basis, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))  # (5, 2), orthonormal columns
    plane = torch.randn(200, 2, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    codes = plane @ basis.T + 7.0  # (200, 5)
    points, names, note = plots.latent_projection(codes)
    assert names == ("PC 1", "PC 2") and "principal components" in note and "100% of variance" in note
    torch.testing.assert_close(torch.pdist(points), torch.pdist(codes))
    assert points[:, 0].var() >= points[:, 1].var()
    torch.testing.assert_close(points.mean(0), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="z_dim ≥ 2"):
        plots.latent_projection(torch.randn(5, 1))


@pytest.mark.parametrize("z_dim", [2, 6])
def test_latent_scatter_colours_the_points_by_label(tmp_path, z_dim):
    labels = torch.arange(300) % 10
    z = torch.randn(300, z_dim) + labels[:, None]
    picture = _read(plots.plot_latent_scatter(z, labels, tmp_path / "scatter.png"))
    assert picture.shape == (round(4.8 * 120), round(5.5 * 120), 3)
    one_class = _read(plots.plot_latent_scatter(z, torch.zeros_like(labels), tmp_path / "one.png"))
    # points are drawn in their label's tab10 colour at alpha 0.8 (the colour bar shows every colour too,
    # so compare with the same codes all labelled 0)
    colours = [tuple(0.8 * c + 0.2 for c in colour) for colour in matplotlib.colormaps["tab10"].colors]
    for label in range(1, 10):
        assert _pixels_of(picture, colours[label]) > _pixels_of(one_class, colours[label]) + 30, label
    assert _pixels_of(one_class, colours[0]) > _pixels_of(picture, colours[0]) + 300
    with pytest.raises(ValueError, match="labels"):
        plots.plot_latent_scatter(z, labels[:-1], tmp_path / "bad.png")


def test_latent_manifold_decodes_a_grid_of_normal_quantiles(tmp_path):
    seen = []

    def decode(z):
        seen.append(z)
        # Brightness Φ(z₁) in the left half of each tile, Φ(z₂) in the right half.
        left = torch.special.ndtr(z[:, :1]).expand(-1, 28 * 14).reshape(-1, 28, 14)
        right = torch.special.ndtr(z[:, 1:]).expand(-1, 28 * 14).reshape(-1, 28, 14)
        return torch.cat([left, right], dim=-1).reshape(-1, 784)

    grid = 5
    path = plots.plot_latent_manifold(decode, tmp_path / "manifold.png", grid=grid)
    z = seen[0]
    assert z.shape == (grid * grid, 2) and z.dtype == torch.float32
    quantiles = torch.special.ndtri(torch.linspace(0.05, 0.95, grid, dtype=torch.float64)).float()
    torch.testing.assert_close(z[:grid, 0], quantiles)  # first row: z₁ left to right
    torch.testing.assert_close(z[::grid, 1], quantiles.flip(0))  # first column: z₂ from the top down
    picture = _read(path)
    assert picture.shape[:2] == (grid * 29 + 1, grid * 29 + 1)
    probabilities = torch.linspace(0.05, 0.95, grid).tolist()
    for index in range(grid):
        # tile (0, index): left half shows Φ(z₁) = p_index; tile (index, 0): right half shows 1 − p_index
        top_row = picture[1 + 14, 1 + index * 29 + 7, 0].item()
        assert top_row == pytest.approx(probabilities[index], abs=1 / 255)
        first_column = picture[1 + index * 29 + 14, 1 + 21, 0].item()
        assert first_column == pytest.approx(probabilities[grid - 1 - index], abs=1 / 255)


def test_latent_manifold_follows_the_family_and_checks_arguments(tmp_path):
    vae = VAE(z_dim=2, hidden_dim=8).double()
    path = plots.plot_latent_manifold(vae.decode, tmp_path / "m.png", grid=3)
    assert _read(path).shape[:2] == (3 * 29 + 1, 3 * 29 + 1)
    with pytest.raises(ValueError, match="grid"):
        plots.plot_latent_manifold(vae.decode, tmp_path / "m.png", grid=1)
    with pytest.raises(ValueError, match="9 images"):
        plots.plot_latent_manifold(lambda z: z[:4], tmp_path / "m.png", grid=3)

"""``pvae demo``: the quick report opens with a figure, every figure it names exists, and the full demo's
image section runs end to end (with tiny settings)."""

import math
import re

import pytest

from pvae import cli
from pvae.report import ReportContext
from pvae.report.diffusion import DigitsDemo, digits_section

FIGURE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def _figures(markdown: str) -> list[str]:
    return FIGURE.findall(markdown)


@pytest.mark.slow
def test_quick_demo_report_opens_with_figures_that_exist(tmp_path):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = (tmp_path / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0] == "# pvae demo report"
    first_figure = next(i for i, line in enumerate(lines) if FIGURE.search(line))
    assert first_figure < 15, "the report should open with a figure"
    figures = _figures(report)
    assert len(figures) >= 10
    for name in figures:
        assert (tmp_path / name).stat().st_size > 5_000, f"{name} is missing or empty"
    for heading in ("toy", "one-hot", "autoencoder", "DDPM on two moons"):
        assert any(line.startswith("## ") and heading.lower() in line.lower() for line in lines), heading
    assert "DDPM on digits" not in report  # the image run is for the full demo only
    timings = report[report.index("## Timings") :]
    assert "| diffusion |" in timings and "diffusion_digits" not in timings
    # the two-moons table states the MMD threshold and places every objective against it
    assert "95th" in report and ("Below the data-vs-data" in report or "Above it:" in report)


@pytest.mark.slow
def test_digits_section_trains_samples_and_reports_bits_per_dim(tmp_path):
    settings = DigitsDemo(
        timesteps=100,
        epochs=1,
        ema_decay=0.0,
        eval_images=3,
        samples=4,
        ddim_steps=5,
        num_train=640,
        lr=1e-2,
        lr_end=1e-3,
    )
    text = digits_section(ReportContext(out=str(tmp_path), quick=False, device="cpu", seed=0), settings)
    bits = float(re.search(r"Test bits/dim: ([0-9.]+) ± ([0-9.]+)", text).group(1))
    # one epoch is far from a good model, but the bound is finite and above what any 8-bit model reaches
    # on digits (DDPM-scale models report about 1 bit/dim) and below a uniform code over 256 levels
    assert math.isfinite(bits) and 0.5 < bits < 8.0
    assert "3 test digits" in text and "4 samples by DDIM" in text
    for name in _figures(text):
        assert (tmp_path / name).stat().st_size > 1_000, f"{name} is missing or empty"

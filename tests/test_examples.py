"""Smoke-run every example with tiny arguments, in this process, through its own command line.

Each script runs as ``python examples/script.py --tiny-args`` would run it (``runpy`` with
``__name__ == "__main__"``, so its argparse defaults are overridden by the tiny arguments), without
starting an interpreter per example.
"""

import os
import runpy
import sys

import pytest
from matplotlib.image import imread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "examples")

# "script.py --tiny-args"; every example script must appear here (see the guard test below).
EXAMPLES = [
    "toy_posterior.py --guide meanfield --num-steps 20",
    "toy_posterior.py --guide exact",
    "evidence_estimators.py --num-samples 10 50 --repeats 3 --num-steps 20",
    "mixture_enumeration.py --num-data 50 --num-steps 10",
    "ae.py --num-epochs 1 --num-train 256 --num-test 64",
    "dae.py --num-epochs 1 --num-train 256 --num-test 64 --corruption gaussian --noise 0.3",
    "vae.py --num-epochs 1 --num-train 256 --num-test 64 --num-samples 10 --z-dim 2 --analytic-kl",
    "diffusion_2d.py --num-steps 5 --timesteps 10 --num-data 512 --num-samples 100",
    "diffusion_2d.py --num-steps 5 --timesteps 10 --num-data 512 --num-samples 100 --time-sampling per_datum",
    "own_family.py --epochs 2 --flips 9",
    "diffusion_mnist.py --num-steps 2 --timesteps 10 --num-train 32 --batch-size 16 --num-test 2 "
    "--num-samples 4 --channels 8 16",
    "latent_diffusion.py --z-dim 2 --hidden-dim 16 --timesteps 5 --prior-hidden-dim 8 --num-train 64 "
    "--num-test 20 --batch-size 32 --autoencoder-epochs 1 --epochs 1 --num-samples 16",
]


def _script(example: str) -> str:
    return example.split()[0]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.replace(" ", "_"))
def test_example_runs(example, tmp_path, monkeypatch, capsys):
    name, *args = example.split()
    path = os.path.join(EXAMPLES_DIR, name)
    monkeypatch.setattr(sys, "argv", [path, *args, "--out", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(path, run_name="__main__")
    assert capsys.readouterr().out, "the example printed nothing"
    pictures = sorted(tmp_path.rglob("*.png"))
    assert pictures, "the example wrote no picture"
    for picture in pictures:
        pixels = imread(str(picture))[..., :3]
        assert min(pixels.shape[:2]) >= 28 and pixels.std() > 0.01, f"{picture.name} is blank"


def test_every_example_is_listed():
    listed = {_script(example) for example in EXAMPLES}
    scripts = []
    for name in sorted(os.listdir(EXAMPLES_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(EXAMPLES_DIR, name)) as handle:
                if "__main__" in handle.read():
                    scripts.append(name)
    missing = sorted(set(scripts) - listed)
    assert not missing, f"examples not smoke-tested in tests/test_examples.py: {missing}"

"""Smoke-run every example with tiny arguments, in a subprocess, as a user would."""

import os
import subprocess
import sys

import pytest

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
]


def _script(example: str) -> str:
    return example.split()[0]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.replace(" ", "_"))
def test_example_runs(example, tmp_path):
    name, *args = example.split()
    command = [sys.executable, os.path.join(EXAMPLES_DIR, name), *args, "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert any(tmp_path.iterdir()), "the example wrote no output"


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

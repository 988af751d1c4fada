"""``python -m pvae`` (e.g. ``torchrun --standalone --nproc-per-node=2 -m pvae train vae …``)."""

import sys

from pvae.cli import main

sys.exit(main())

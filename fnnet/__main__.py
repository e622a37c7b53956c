"""``python -m fnnet ...`` is the ``fnnet`` command (``torchrun -m fnnet train digits`` runs it on every rank)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m faceattrs`` (also what ``torchrun -m faceattrs`` runs)."""

import sys

from .cli import main

sys.exit(main())

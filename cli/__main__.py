"""``python -m cli ...`` (and ``torchrun -m cli ...``) runs the ``saf`` command."""

import sys

from cli import main

sys.exit(main())

"""`python -m letterpress.cli ...` (also what `torchrun -m letterpress.cli train ...` runs)."""

import sys

from . import main

sys.exit(main())

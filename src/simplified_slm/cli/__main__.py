"""`python -m simplified_slm.cli ...` (also what torchrun launches)."""

import sys

from simplified_slm.cli.main import main

sys.exit(main())

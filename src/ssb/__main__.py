"""`python -m ssb ...` (also what `accelerate launch -m ssb train ...` runs)."""

import sys

from ssb.cli import main

sys.exit(main())

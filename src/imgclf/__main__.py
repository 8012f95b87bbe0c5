"""``python -m imgclf``: the same command line as the ``imgclf`` script (torchrun runs it this way)."""

import sys

from imgclf.cli import main

sys.exit(main())

"""`python -m lmgen ...` (and `torchrun ... -m lmgen serve ...`) run the command line."""

import sys

from lmgen.cli import main

sys.exit(main())

"""`python -m gemmascope.cli` (as torchrun runs it): the `gemmascope` command."""

import sys

from gemmascope.cli import main

sys.exit(main())

"""`python -m expand` is the `expand` command."""

import sys

from expand.cli import main

sys.exit(main())

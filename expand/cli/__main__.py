import sys

from expand.cli import main

sys.exit(main())

"""``python -m ut`` is the ``ut-tunnel`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m ut.udpmon {echo,probe} ...``: the same as ``ut-tunnel udpmon``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m rewardlab`` runs the command line (same as the ``rewardlab`` console script)."""
import sys

from .cli import main

sys.exit(main())

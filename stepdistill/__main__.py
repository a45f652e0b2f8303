"""`python -m stepdistill ...`, the same as the `stepdistill` command (and what `torchrun -m stepdistill` launches)."""
import sys

from .cli import main

sys.exit(main())

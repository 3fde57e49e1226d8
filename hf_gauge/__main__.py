"""``python -m hf_gauge``: the hf-gauge command line."""
import sys

from .cli import main

sys.exit(main())

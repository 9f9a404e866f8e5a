"""python -m pretrain.scaling plan|launch|collect|fit|plot|compare (see pretrain/scaling/cli.py)."""
import sys

from .cli import main

sys.exit(main())

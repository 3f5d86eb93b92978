"""`python -m qlora_engine.plan` = `qlora plan`."""

import sys

from ..cli import main

sys.exit(main(["plan", *sys.argv[1:]]))

"""`python -m qlora_engine.export` = `qlora export`."""

import sys

from ..cli import main

sys.exit(main(["export", *sys.argv[1:]]))

"""`python -m qlora_engine.quantize` = `qlora quantize` (kept: the README has always documented it)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))

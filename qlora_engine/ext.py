"""`python -m qlora_engine.ext` = `qlora ext` (kept: the README has always documented it)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["ext", *sys.argv[1:]]))

"""`python -m qlora_engine COMMAND ...` = `qlora COMMAND ...` (and what `accelerate launch -m qlora_engine` runs)."""

import sys

from .cli import main

sys.exit(main())

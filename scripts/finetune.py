"""Fine-tune a causal LM with QLoRA: NF4 base, LoRA on every linear layer, adapter in PEFT format.

    python scripts/finetune.py                            # the demo (qlora_engine/data/demo.yaml)
    python scripts/finetune.py --config my.yaml [--key value ...]
    python scripts/finetune.py --model DIR --data train.jsonl --output-dir runs/x --max-steps 500

The same as `qlora finetune ...`: every run key is also a flag; flags override the file.
`--dry-run` shows two rendered samples with the trained-on tokens marked; `--resume` continues
from the newest checkpoint.
"""

import sys

from qlora_engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))

"""Fetch and convert the default test model (SmolLM2-135M-Instruct) and print its directory.

    python scripts/get_test_model.py
"""

from qlora_engine.models import default_model

if __name__ == "__main__":
    print(default_model.ensure())

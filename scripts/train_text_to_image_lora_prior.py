#!/usr/bin/env python
"""Train a LoRA adapter of the Kandinsky 2.2 prior with diffusers' flags for this script, plus
--backend.

python scripts/train_text_to_image_lora_prior.py --help
"""

import sys

from kandinsky_common.cli import main

if __name__ == "__main__":
    sys.exit(main("prior", lora=True))

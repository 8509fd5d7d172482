#!/usr/bin/env python
"""The name diffusers' Kandinsky 2.2 README gives the LoRA prior script
(train_text_to_image_lora_prior.py), so its command lines paste unchanged.
"""

import sys

from kandinsky_common.cli import main

if __name__ == "__main__":
    sys.exit(main("prior", lora=True))

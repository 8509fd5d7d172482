#!/usr/bin/env python
"""The name diffusers' Kandinsky 2.2 README gives the LoRA decoder script
(train_text_to_image_lora_decoder.py), so its command lines paste unchanged.
"""

import sys

from kandinsky_common.cli import main

if __name__ == "__main__":
    sys.exit(main("decoder", lora=True))

#!/usr/bin/env python
"""Fine-tune the Kandinsky 2.2 prior with diffusers' flags for this script, plus --backend.

python scripts/train_text_to_image_prior.py --help
"""

import sys

from kandinsky_common.cli import main

if __name__ == "__main__":
    sys.exit(main("prior"))

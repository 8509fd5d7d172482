"""Test and demo fixtures, apart from the product: the real CLIP tokenizer built from a registry
wheel, a small captioned photo set, and random Kandinsky 2.2 folders written by diffusers.

The product never imports this package; tests, the demo, the benchmark and the scripts that make
fixtures do.
"""

"""Flax NNX ports of the Kandinsky 2.2 networks (attribute names = diffusers/transformers names)."""

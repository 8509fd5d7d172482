"""Weight conversion between torch-layout state dicts (numpy) and Flax NNX models.

One `Table` per model (clip.py, prior.py, unet.py, movq.py beside this file) lists rules
`Rule(torch_template, flax_template, op)`. Templates use `{name}` placeholders for one dotted key
component each (`{i}` for a layer index, `{m}` for a module name), so the same table drives
torch -> flax and flax -> torch. Every conversion raises on any source key no rule uses, any target
key left missing, and any shape that does not fit: a silent partial load is impossible.
"""

from flax_kandinsky.convert.engine import (
    CONV,
    IDENTITY,
    LINEAR,
    ConversionError,
    Rule,
    Table,
    flat_state,
    flatten,
    load_into,
    to_torch_layout,
)

__all__ = [
    "CONV",
    "IDENTITY",
    "LINEAR",
    "ConversionError",
    "Rule",
    "Table",
    "flat_state",
    "flatten",
    "load_into",
    "to_torch_layout",
]

"""What transformers and diffusers print that tells a user of this backend nothing.

- Per-model progress bars ("Loading weights", "Writing model shards", "Loading pipeline
  components..."): a run loads and saves a handful of folders, and each would draw its own bar
  around our training bar.
- transformers' warning that `CLIPImageProcessor` falls back to `CLIPImageProcessorPil` without
  torchvision: diffusers' Kandinsky prior pipeline imports the old name, and the PIL processor is
  the one this project uses on purpose (kandinsky_common/preprocess.py matches it).

Every other warning and error stays as the libraries emit it, and so do the hub's progress bars
(the --push_to_hub upload of a large model).
"""

from __future__ import annotations

import logging

_PROCESSOR_FALLBACK = "`CLIPImageProcessor` requires torchvision"


class _DropProcessorFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_PROCESSOR_FALLBACK)


_FILTER = _DropProcessorFallback()


def quiet_libraries() -> None:
    """Idempotent; must run before diffusers' pipelines are imported (the warning fires then)."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    logging.getLogger("transformers.utils.import_utils").addFilter(_FILTER)
    hub_bars = not hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # switches the hub's bars off as well
    if hub_bars:
        hub.enable_progress_bars()
    diffusers_logging.disable_progress_bar()

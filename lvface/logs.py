"""Library messages that tell an lvface user nothing, silenced where they are emitted.

Each entry names one message, not a level or a whole library, so that every other warning still
reaches the user:
- DeepSpeed's accelerator probe warns "Setting accelerator to CPU ..." in every process that imports
  it (each rank, eval, export); lvface logs the device it runs on itself ("rank 0/2 ... on cpu").
- torch 2.13 deprecates `all_gather_into_tensor` / `reduce_scatter_tensor` in favour of the `_single`
  forms; DeepSpeed's ZeRO calls the old names once per rank (lvface's own collectives use the new
  ones where torch has them).

`quiet_library_messages()` runs when the lvface package is imported, before anything imports
DeepSpeed: the DeepSpeed logger keeps filters added before it is configured.
"""

from __future__ import annotations

import logging
import warnings

DEEPSPEED_LOGGER = "DeepSpeed"
_DROPPED_LOG_MESSAGES = ("Setting accelerator to CPU.",)
_DROPPED_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DROPPED_LOG_MESSAGES)


def quiet_library_messages() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
        logger.addFilter(_DropMessages())
    for category, message in _DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

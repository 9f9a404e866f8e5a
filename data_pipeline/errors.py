"""Error type and the raise-or-count policy shared by the corpus readers and the loader."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("data_pipeline")

ON_ERROR_CHOICES = ("raise", "skip")


class DataError(ValueError):
    """Bad input data; the message names the file/shard and line/entry."""

    def __init__(self, reason: str, where: str, detail: str):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: {detail}")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


def handle(error: DataError, on_error: str, skipped: Counter | None) -> None:
    """Raise `error`, or count it under its reason (and log it) when the user chose to skip."""
    if on_error == "raise":
        raise error
    if skipped is not None:
        skipped[error.reason] += 1
    log.warning("skipped (%s) %s", error.reason, error)

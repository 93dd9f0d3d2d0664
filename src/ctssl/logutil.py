"""One logging setup for every workflow script: the Snakemake log file and stderr get the same lines."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO, append: bool = False,
                  prefix: str = "") -> logging.Logger:
    """Log to stderr and `log_file` (rewritten, or appended to: the ranks of a multi-process run share the job's
    log, each line starting with `prefix`)."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if not append:
            Path(log_file).write_text("")
        # Always O_APPEND: the job and its ranks write to one file, none overwriting another's lines.
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return logging.getLogger("ctssl")

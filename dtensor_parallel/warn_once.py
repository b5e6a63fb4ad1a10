"""One log line per fallback: the kernel choices that fall back to NCCL ("auto" where Triton
or symmetric memory cannot run, a call the fused op cannot serve) say so once per process and
reason, not once per layer or step."""

from __future__ import annotations

import logging

_SEEN: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, key: str, msg: str, *args) -> None:
    """``logger.warning(msg, *args)`` the first time ``(logger, key)`` is seen."""
    if (logger.name, key) not in _SEEN:
        _SEEN.add((logger.name, key))
        logger.warning(msg, *args)


def forget() -> None:
    """Log every fallback again (tests; a worker process may have logged one before)."""
    _SEEN.clear()

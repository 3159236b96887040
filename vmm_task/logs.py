"""Agent logging: one line per record on stderr (the guest console when PID 1)."""

import logging

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": logging.DEBUG}


def setup_logging(level: str) -> None:
    """`level`: one of Kuasar's names (error, warn, info, debug, trace)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("vmm-task %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))

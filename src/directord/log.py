"""configure_logging() for entry points; library code adds no handlers."""

from __future__ import annotations

import logging
import re
import sys

_URL_SECRET = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]+@")


class _MaskSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "://" in record.msg:
            record.msg = _URL_SECRET.sub(r"\1***@", record.msg)
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _URL_SECRET.sub(r"\1***@", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def configure_logging(debug: bool = False, name: str = "directord") -> None:
    """Log to stderr, one line per event, secrets in URLs masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(_MaskSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("asyncio").setLevel(logging.WARNING)

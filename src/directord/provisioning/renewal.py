"""A provisioned node re-enters provisioning before its certificate expires.

Each node picks its moment at random in the last half of the
``--reprovision-before`` window before ``notAfter``, so a fleet enrolled in one
minute does not come back in one minute. A node whose certificate is already
inside that window goes within ``START_SPREAD`` seconds. A node re-enters at
most once per ``MIN_INTERVAL`` (kept in its cache directory): a certificate
issued shorter than the window must not send it round in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from directord.config import Settings

log = logging.getLogger(__name__)
START_SPREAD = 5.0
MIN_INTERVAL = 3600.0
STAMP = "reprovisioned"


def certificate_path(settings: Settings) -> str | None:
    """The node certificate the client uses, if it provisions and uses one."""
    if not settings.provisioning_address or settings.reprovision_before <= 0:
        return None
    if settings.driver not in ("grpc", "grpcd"):
        return None
    from directord.transports.grpc import GrpcOptions

    opts = settings.options(GrpcOptions)
    return opts.grpc_ssl_cert if opts.grpc_ssl else None


def delay_until_renewal(
    not_after: float, before: float, now: float, last: float, rng: random.Random
) -> float:
    """Seconds from ``now`` until this node re-enters provisioning."""
    window_start = not_after - before
    moment = window_start + rng.uniform(0.0, before / 2)
    if moment <= now:
        moment = now + rng.uniform(0.0, START_SPREAD)
    return max(moment, last + MIN_INTERVAL) - now


async def watch(settings: Settings, renew: Callable[[], None]) -> None:
    """Sleep until the renewal moment, then call ``renew`` (the client restarts)."""
    path = certificate_path(settings)
    if path is None:
        return
    # Imported here: a client that renews no certificate need not map cryptography.
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(await asyncio.to_thread(Path(path).read_bytes))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s to schedule re-provisioning: %s", path, exc)
        return
    stamp = Path(settings.cache_path) / STAMP
    try:
        last = float(stamp.read_text())
    except (OSError, ValueError):
        last = 0.0
    not_after = cert.not_valid_after_utc.timestamp()
    delay = delay_until_renewal(
        not_after, settings.reprovision_before, time.time(), last, random.Random()
    )
    log.info("certificate expires in %.0fs; re-provisioning in %.0fs", not_after - time.time(),
             delay)  # fmt: skip
    await asyncio.sleep(delay)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{time.time()}\n")
    log.warning("certificate expires soon: re-entering provisioning")
    renew()

"""Secrets at rest: files of mode 0600 in directories of mode 0700.

The node cache and journal (job output, cached args) and the server's
datastore hold secrets. They are created private from the start, with the
mode given to ``mkdir``/``open`` (the umask can only narrow it), never by a
chmod afterwards that would leave a moment with wider rights; what an older
install left wider is tightened when it is opened.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_GROUP_OTHER = 0o077


def private_directory(path: str | Path, *, tighten: bool) -> None:
    """Create ``path`` and its missing parents, each with mode 0700.

    Args:
        path: the directory.
        tighten: when the directory already exists with rights for group or
            others, take them away (logged once at INFO). Only for a directory
            that is ours alone, never for one others share.

    Raises:
        PermissionError: ``tighten`` and the directory is shared (sticky or
            writable by others, as ``/tmp``): it cannot be made private.
        OSError: a directory cannot be created or changed.
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    if not tighten or missing:
        return
    # Check and change one open directory, not a name that could change in between.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if not mode & _GROUP_OTHER:
            return
        if mode & (stat.S_ISVTX | stat.S_IWOTH):
            raise PermissionError(
                errno.EPERM,
                f"a shared directory (mode {mode:04o}) cannot hold secrets; give it one of its own",
                str(path),
            )
        os.fchmod(fd, mode & ~_GROUP_OTHER)
    finally:
        os.close(fd)
    log.info("%s was mode %04o; now %04o: it holds secrets", path, mode, mode & ~_GROUP_OTHER)


def private_file(path: str | Path, *, create: bool = True) -> None:
    """Make sure the file at ``path`` has no rights for group or others.

    A new file is created empty with mode 0600; an existing one (from an older
    install) loses its group and other bits.

    Args:
        path: the file.
        create: create it when absent; otherwise an absent file is left absent.

    Raises:
        OSError: the file cannot be created or changed.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & _GROUP_OTHER:
            os.fchmod(fd, mode & ~_GROUP_OTHER)
    finally:
        os.close(fd)

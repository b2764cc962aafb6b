"""Helpers shared by the file components (WORKDIR, ADD/COPY): ownership, modes, safe opens.

The agent runs as root, while a local user may plant a symlink wherever a
job will write. So owner and mode are only ever set on an open descriptor
(``fchown``/``fchmod``), and a path is opened with ``O_NOFOLLOW``: a symlink
at the final name is never followed into what it points to. WORKDIR refuses
it; COPY renames its new file over it, which replaces the link itself.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat

from directord.errors import ComponentArgsError, ComponentError


def parse_mode(text: str) -> int:
    """Octal mode text (``0644``, ``755``) to an int."""
    try:
        mode = int(str(text), 8)
    except ValueError:
        raise ComponentArgsError(f"--chmod: {text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o7777:
        raise ComponentArgsError(f"--chmod: {text!r} is out of range")
    return mode


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {user!r}") from None


def _gid(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}") from None


def owner_ids(chown: str | None) -> tuple[int, int]:
    """The uid and gid of ``user[:group]``; -1 for a part left as it is.

    Raises:
        ValueError: an unknown user or group name.
    """
    if not chown:
        return -1, -1
    user, _, group = chown.partition(":")
    return (_uid(user) if user else -1), (_gid(group) if group else -1)


def apply_owner_mode(fd: int, uid: int = -1, gid: int = -1, mode: int | None = None) -> None:
    """Set the owner, then the mode, of an open file or directory.

    The owner goes first because a change of owner clears setuid and setgid
    bits that the mode may ask for.
    """
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
    if mode is not None:
        os.fchmod(fd, mode)


def open_directory(path: str) -> int:
    """A descriptor on the directory at ``path``, never through a symlink at that name.

    Raises:
        ComponentError: a symlink is at ``path``.
        OSError: anything else that is not a directory, or cannot be opened.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # O_NOFOLLOW with O_DIRECTORY says ENOTDIR for a symlink (ELOOP without it).
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise ComponentError("is a symbolic link; refusing to follow it") from None
        raise


#: The umask jobs get, whatever the agent's own (its unit has UMask=0077): what a job
#: creates is as a root shell would create it.
JOB_UMASK = 0o022
NEW_DIRECTORY_MODE = 0o777 & ~JOB_UMASK


def make_directories(path: str, leaf_mode: int | None = None) -> None:
    """Create ``path`` and its missing parents: mode 0755 (``leaf_mode`` for the last).

    Each directory created is fchmod-ed through a descriptor opened without
    following symlinks, so the agent's own umask does not decide what jobs get.
    Existing directories are left as they are.
    """
    missing: list[str] = []
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: theirs
            os.mkdir(folder, 0o700)
            fd = open_directory(folder)
            try:
                mode = leaf_mode if folder == missing[0] and leaf_mode is not None else None
                os.fchmod(fd, NEW_DIRECTORY_MODE if mode is None else mode)
            finally:
                os.close(fd)


def open_regular(path: str) -> int | None:
    """A read descriptor on the regular file at ``path``, never through a symlink.

    Returns None when no regular file is there: nothing, a symlink or a FIFO,
    say. Callers then put a new file in its place with a rename, which
    replaces the name itself and leaves whatever a symlink points to alone.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the name must not hang the job.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd

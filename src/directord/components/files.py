"""Helpers shared by the file components (WORKDIR, ADD/COPY): ownership and modes."""

from __future__ import annotations

import grp
import os
import pwd

from directord.errors import ComponentArgsError


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
    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def _gid(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def apply_owner_mode(path: str, chown: str | None, chmod: str | None) -> None:
    """Chown ``user[:group]`` and chmod a path. Raises KeyError for unknown users."""
    if chown:
        user, _, group = chown.partition(":")
        os.chown(path, _uid(user) if user else -1, _gid(group) if group else -1)
    if chmod:
        os.chmod(path, parse_mode(chmod))

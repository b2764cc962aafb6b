"""ADD and COPY: send files from the submitting machine to the nodes.

The source glob is expanded where the job is submitted, with the rights of
the user who submits it: the CLI (or library) hashes and uploads each
matching file, and the server keeps it by SHA-256; it never opens a path a
user named. Only those files can ever be fetched by a node, and only by a
node the job targets; with ``--per-node``, each node only the file named
after it. Files stream in 1 MiB chunks into a temporary file
beside the destination, are checked against their SHA-256 and then renamed
into place. A destination whose content already matches is not transferred.
``--blueprint`` renders the file with the node's cached args first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import re
import tempfile
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome, ServerHook, ServerJob
from directord.components.files import (
    apply_owner_mode,
    make_directories,
    open_regular,
    owner_ids,
    parse_mode,
)
from directord.errors import ComponentArgsError, ComponentError, OrchestrationError
from directord.models import FileRef, SourceFile
from directord.security.identities import identity_problem

log = logging.getLogger(__name__)
BLUEPRINT_LIMIT = 16 * 1024 * 1024


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def per_node_name(src: str, identity: str) -> str:
    """The file name a node may receive from a ``--per-node`` COPY."""
    return os.path.basename(src).replace("{identity}", identity)


def per_node_identity(src: str, name: str) -> str | None:
    """The node a ``--per-node`` file is for, or None when no node may have it.

    ``name`` must be the SRC file name with one identity in every ``{identity}``,
    and that identity must be one a node may register under (not ``server``,
    ``client`` or ``ca``).
    """
    parts = [re.escape(p) for p in os.path.basename(src).split("{identity}")]
    match = re.fullmatch("(.+?)".join(parts[:2]) + "".join(r"\1" + p for p in parts[2:]), name)
    if match is None or len(parts) < 2:
        return None
    identity = match.group(1)
    return None if identity_problem(identity) else identity


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while block := os.read(fd, 1024 * 1024):
        digest.update(block)
    return digest.hexdigest()


def _same_file(
    path: str, size: int, sha256: str, uid: int = -1, gid: int = -1, mode: int | None = None
) -> bool:
    """True when the regular file at ``path`` already holds exactly this content.

    It is opened without following a symlink, and a match gets its owner and
    mode through that same descriptor, so nothing can swap the file between
    the check and the chown. A symlink is never the same file, even when what
    it points to matches: the caller renames a new file over it.
    """
    fd = open_regular(path)
    if fd is None:
        return False
    try:
        if os.fstat(fd).st_size != size or _sha256_fd(fd) != sha256:
            return False
        apply_owner_mode(fd, uid, gid, mode)
        return True
    finally:
        os.close(fd)


def _write_if_changed(
    path: str, content: bytes, uid: int = -1, gid: int = -1, mode: int | None = None
) -> bool:
    """Atomically write content unless the file already holds it; True if written.

    The new content goes to an ``O_EXCL`` temporary file beside ``path`` (a
    planted symlink cannot redirect it), gets its owner and mode on the
    descriptor, then is renamed over ``path``, replacing a symlink there
    rather than writing through it.
    """
    if _same_file(path, len(content), hashlib.sha256(content).hexdigest(), uid, gid, mode):
        return False
    fd, tmp = tempfile.mkstemp(prefix=".directord-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            apply_owner_mode(fh.fileno(), uid, gid, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


CHUNK = 1024 * 1024


def _whole(params: dict[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OrchestrationError(f"{key} must be a whole number", path="<node>")
    return value


class CopyServer(ServerHook):
    """Serves a COPY's files to its targets in chunks, each node only what is its own."""

    requests: ClassVar[frozenset[str]] = frozenset({"chunk"})

    async def request(
        self, node: str, job: ServerJob, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        index, offset = _whole(params, "index"), _whole(params, "offset")
        files = job.files
        if not 0 <= index < len(files) or not 0 <= offset <= files[index].size:
            raise OrchestrationError("no such file or offset in this job", path="<node>")
        wanted = files[index]
        if job.options.get("per_node") and wanted.name != per_node_name(
            str(job.options.get("src", "")), node
        ):
            log.warning("node %s asked for %s, another node's file; refused", node, wanted.name)
            raise OrchestrationError("that file is not for this node", path="<node>")
        # Clamped: at most CHUNK bytes, and a negative size would read the whole file.
        size = max(1, min(_whole(params, "size", CHUNK), CHUNK))
        data = await self.ctx.read_file(wanted.sha256, offset, size)
        return {"data": data, "eof": offset + len(data) >= wanted.size}


class Copy(Component):
    """``COPY: [--chown U[:G]] [--chmod MODE] [--blueprint] SRC_GLOB DEST``."""

    verb: ClassVar[str] = "COPY"
    summary: ClassVar[str] = "Copy files matching SRC_GLOB to DEST on the nodes."
    takes_files: ClassVar[bool] = True
    server_hook: ClassVar[type[ServerHook] | None] = CopyServer

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--chown", metavar="USER[:GROUP]", help="owner of the copied files")
        parser.add_argument("--chmod", metavar="MODE", help="octal mode of the copied files")
        parser.add_argument(
            "--blueprint",
            action="store_true",
            help="render each file as a Jinja2 template with the node's args",
        )
        parser.add_argument(
            "--per-node",
            action="store_true",
            help="SRC contains {identity}: each node gets only the file named "
            "for it (per-node secrets); the server enforces this",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 2:
            raise ComponentArgsError(f"{self.verb}: expected SRC_GLOB DEST")
        if options.get("chmod"):
            parse_mode(options["chmod"])
        options["src"], options["dest"] = options.pop("argv")
        if options.get("per_node") and "{identity}" not in os.path.basename(options["src"]):
            raise ComponentArgsError(
                f"{self.verb}: --per-node needs {{identity}} in the file name of SRC"
            )

    def source_files(self, options: dict[str, Any], cwd: str) -> list[SourceFile]:
        per_node = bool(options.get("per_node"))
        pattern = os.path.join(cwd, os.path.expanduser(options["src"])).replace("{identity}", "*")
        matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if per_node:
            # Only files named for a possible node: never server.key_secret or the
            # shared client.key_secret, which no node may register as.
            matches = [p for p in matches if per_node_identity(options["src"], os.path.basename(p))]
        if not matches and not per_node:
            raise ComponentArgsError(f"{self.verb}: no file matches {options['src']!r}")
        files = []
        for path in matches:
            try:
                ref = FileRef(os.path.basename(path), os.path.getsize(path), sha256_file(path))
            except OSError as exc:
                raise ComponentArgsError(
                    f"{self.verb}: cannot read {path}: {exc.strerror}"
                ) from None
            files.append(SourceFile(os.path.abspath(path), ref))
        return files

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        files = ctx.files
        indexes = list(range(len(files)))
        if options.get("per_node"):
            own = per_node_name(options["src"], ctx.identity)
            indexes = [i for i in indexes if files[i].name == own]
            if not indexes:
                # Nodes without a file of their own (e.g. on the shared key) have nothing to do.
                return Outcome.ok(f"no {own} for this node")
        if not files:
            return Outcome.fail(f"{self.verb}: the job carries no files")
        dest = ctx.render(options["dest"])
        try:
            uid, gid = owner_ids(options.get("chown"))
        except ValueError as exc:
            raise ComponentError(f"{self.verb}: {exc}") from None
        mode = parse_mode(options["chmod"]) if options.get("chmod") else None
        into_dir = (
            dest.endswith("/") or len(indexes) > 1 or await asyncio.to_thread(os.path.isdir, dest)
        )
        lines = []
        for index in indexes:
            info = files[index]
            target = os.path.join(dest, info.name) if into_dir else dest
            # Owner and mode travel with the content: they are set on the new file's
            # descriptor before its rename, or on the unchanged file's own descriptor.
            try:
                await asyncio.to_thread(make_directories, os.path.dirname(target) or ".")
                if options.get("blueprint"):
                    changed = await self._blueprint(ctx, index, target, uid, gid, mode)
                else:
                    changed = await self._transfer(ctx, index, info, target, uid, gid, mode)
            except OSError as exc:
                raise ComponentError(f"{self.verb} {target}: {exc}") from None
            lines.append(f"{'copied' if changed else 'unchanged'} {target}")
        return Outcome.ok("\n".join(lines))

    async def _transfer(
        self,
        ctx: ExecContext,
        index: int,
        info: FileRef,
        target: str,
        uid: int,
        gid: int,
        mode: int | None,
    ) -> bool:
        size, sha256 = info.size, info.sha256
        if await asyncio.to_thread(_same_file, target, size, sha256, uid, gid, mode):
            return False
        await ctx.fetch_file(index, target, sha256, size, uid=uid, gid=gid, mode=mode)
        return True

    async def _blueprint(
        self, ctx: ExecContext, index: int, target: str, uid: int, gid: int, mode: int | None
    ) -> bool:
        raw = await ctx.fetch_bytes(index, BLUEPRINT_LIMIT)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ComponentError(f"{self.verb}: --blueprint needs a UTF-8 text file") from None
        content = ctx.render(text).encode()
        return await asyncio.to_thread(_write_if_changed, target, content, uid, gid, mode)


class Add(Copy):
    """``ADD``: the same as COPY."""

    verb: ClassVar[str] = "ADD"

"""Files uploaded for COPY/ADD jobs, kept by SHA-256; the server never opens a user's path.

The CLI (or library) finds a job's files and reads them with the rights of
the user who submits the job, then uploads them over the API connection, in
order, 1 MiB at a time (``file_put``). Each upload streams into a private
temporary file and is hashed as it arrives; only a complete upload whose
size and SHA-256 match what was announced enters the store. A submission may
then name only files uploaded on the same connection: knowing a file's hash
is not enough to send it to a node, having its content is.

Layout under the store directory (0700; files 0600)::

    ab/abcdef...   one file per content (SHA-256, hex)
    tmp/           uploads in progress; emptied at start
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from directord.errors import ConfigError, OrchestrationError
from directord.security.private import private_directory

DEFAULT_ROOT = "/var/lib/directord/files"
#: The most one ``file_put`` may carry (connect.UPLOAD_CHUNK, what the CLI sends).
UPLOAD_CHUNK = 1024 * 1024
#: Uploads one API connection may have open at once.
MAX_OPEN_UPLOADS = 16
#: The largest file the store takes (a COPY is not a way to fill the server's disk by mistake).
MAX_FILE_SIZE = 1 << 40
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(value: object) -> str:
    """The hex SHA-256 ``value``, or OrchestrationError when it is not one."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise OrchestrationError(f"invalid sha256 {str(value)[:80]!r}", path="<api>")
    return value


def default_root(datastore: str) -> str | None:
    """The store beside a file-backed datastore (``sqlite:``/``file:``), else None."""
    if datastore.startswith("sqlite:///"):
        return str(Path(datastore[len("sqlite://") :].split("?")[0]).parent / "files")
    if datastore.startswith("file:///"):
        return str(Path(datastore[len("file://") :].split("?")[0]) / "files")
    return None


class FileStore:
    """Content-addressed files on the server's disk."""

    def __init__(self, root: str | Path, *, private: bool = False) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self._private = private  # a directory of our own, removed at close

    @classmethod
    def for_settings(cls, file_store: str, datastore: str) -> FileStore:
        """The store ``--file-store`` names, else beside the datastore (see its help).

        With a memory datastore nothing outlives the server, its files neither: they
        go to a private temporary directory, removed at close.
        """
        root = file_store or default_root(datastore)
        if root is None and datastore == "memory":
            return cls(tempfile.mkdtemp(prefix="directord-files-"), private=True)
        return cls(root or DEFAULT_ROOT)

    def close(self) -> None:
        """Remove a private store (a memory datastore's); a real one stays."""
        if self._private:
            shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        """Create the directory (0700) and drop uploads a previous run left unfinished.

        Raises:
            ConfigError: the directory cannot be created.
        """
        try:
            private_directory(self.root, tighten=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(mode=0o700)
        except OSError as exc:
            raise ConfigError(
                f"{self.root}: cannot create the file store: {exc.strerror}", key="file_store"
            ) from None

    def path(self, sha256: str) -> Path:
        """Where the file of this content lives."""
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """True when the store holds this content."""
        return self.path(sha256).is_file()

    async def read(self, sha256: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a stored file from ``offset``.

        Raises:
            OrchestrationError: the store no longer holds it (purged, or lost with the disk).
        """
        try:
            return await asyncio.to_thread(_read_chunk, self.path(sha256), offset, size)
        except FileNotFoundError:
            raise OrchestrationError(
                f"file {sha256[:12]} is no longer on the server", path="<node>"
            ) from None

    def keep_only(self, wanted: Iterable[str]) -> int:
        """Delete every stored file whose hash is not in ``wanted``; returns how many."""
        keep = set(wanted)
        removed = 0
        for folder in self.root.iterdir():
            if folder == self.tmp or not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
        return removed

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move a verified upload into place (a second copy of known content is dropped)."""
        target = self.path(sha256)
        if target.is_file():
            tmp.unlink(missing_ok=True)
            return
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(tmp, target)


class _Upload:
    """One file arriving in order on one API connection."""

    def __init__(self, store: FileStore, sha256: str, size: int) -> None:
        self.store = store
        self.sha256 = sha256
        self.size = size
        self.received = 0
        self.digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="upload-")  # 0600, O_EXCL
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)
        self.received += len(data)

    def finish(self) -> None:
        self.file.close()
        if self.digest.hexdigest() != self.sha256:
            self.abort()
            raise OrchestrationError(
                f"upload of {self.sha256[:12]}: content does not match its sha256 "
                "(the file changed while it was read?)",
                path="<api>",
            )
        self.store.adopt(self.path, self.sha256)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


class UploadSession:
    """The uploads of one API connection, and the files it has proven to hold."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.proven: set[str] = set()
        self._open: dict[str, _Upload] = {}

    def put(self, sha256: object, size: object, offset: object, data: object) -> dict[str, int]:
        """Take the next piece of a file; returns how many bytes of it arrived so far.

        Raises:
            OrchestrationError: a bad field, a piece out of order, too many open uploads,
                or content that does not match its hash (the upload is dropped).
        """
        sha = check_sha256(sha256)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
            raise OrchestrationError(f"upload {sha[:12]}: invalid size {size!r}", path="<api>")
        if not isinstance(data, bytes) or len(data) > UPLOAD_CHUNK:
            raise OrchestrationError(
                f"upload {sha[:12]}: data must be bytes of at most {UPLOAD_CHUNK}", path="<api>"
            )
        upload = self._open.get(sha)
        if upload is None:
            if offset != 0:
                raise OrchestrationError(f"upload {sha[:12]}: must start at 0", path="<api>")
            if len(self._open) >= MAX_OPEN_UPLOADS:
                raise OrchestrationError(
                    f"more than {MAX_OPEN_UPLOADS} uploads open on one connection", path="<api>"
                )
            upload = self._open[sha] = _Upload(self.store, sha, size)
        if offset != upload.received or size != upload.size:
            self._drop(sha)
            raise OrchestrationError(
                f"upload {sha[:12]}: piece at {offset!r} of {size!r} bytes does not follow "
                f"{upload.received} of {upload.size}",
                path="<api>",
            )
        if upload.received + len(data) > upload.size:
            self._drop(sha)
            raise OrchestrationError(f"upload {sha[:12]}: more data than announced", path="<api>")
        upload.write(data)
        if upload.received == upload.size:
            del self._open[sha]
            upload.finish()
            self.proven.add(sha)
        return {"received": upload.received}

    def _drop(self, sha: str) -> None:
        upload = self._open.pop(sha, None)
        if upload is not None:
            upload.abort()

    def close(self) -> None:
        """The connection ended: drop unfinished uploads."""
        for sha in list(self._open):
            self._drop(sha)


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)

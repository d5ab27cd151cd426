"""Atomic outputs: a file or a directory is either complete or absent, never half-written.

Files are written to a temporary name beside the target and renamed into place; directories are
built as a hidden sibling (``.<name>.partial-*``) and renamed once complete, also when the work
fails or is interrupted (Ctrl-C). An existing output is replaced only when the caller says so
(``force``), and only at that final rename. (A process killed outright, e.g. SIGKILL, can leave a
hidden temporary behind, but never a half-written output.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


class OutputError(ValueError):
    """An output that may not or cannot be written; the message says why and what to do."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (``torch.save``, safetensors,
    ``savefig``); renamed onto ``path`` with the usual permissions when the block succeeds, deleted when it
    raises. With ``force=False`` an existing file is refused."""
    path = Path(path)
    if not force and path.exists():
        raise OutputError(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp files are private (0600); give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; with ``force=False`` an existing file is refused."""
    with atomic_file(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output directory that exists (unless ``force``) or whose parent cannot take one."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    if out.exists() and not force:
        raise OutputError(f"output directory {out} already exists; pass --force to replace it")
    # Try it rather than trust permission bits (root ignores them; read-only mounts do not).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write the output directory {out}: {e.strerror} ({e.filename})") from None


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike[str], force: bool) -> Iterator[Path]:
    """A fresh hidden sibling of ``out`` to write into; renamed to ``out`` when the block succeeds,
    deleted when it raises (KeyboardInterrupt included)."""
    out = Path(out)
    check_output_dir(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        if out.exists():
            if not force:
                raise OutputError(f"output directory {out} appeared while it was being written; pass --force to replace it")
            retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, retired)
            os.rename(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

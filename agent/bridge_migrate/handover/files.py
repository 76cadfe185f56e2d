"""A manager's configuration files as the hand-over changes them: each file's text before and
after, so that the rollback (and the dead man, from the record) can put back exactly what was
there, or remove what was not.

Writes are atomic (a temporary file beside the target, fsync, rename, fsync of the directory): a
crash leaves the old file or the new one, never half of either, and the manager never reads a
file being written.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileState:
    text: str | None  # None: the file does not exist
    mode: int = 0o644

    @property
    def exists(self) -> bool:
        return self.text is not None


ABSENT = FileState(None)


@dataclass(frozen=True)
class FileChange:
    path: str
    before: FileState
    after: FileState

    def __str__(self) -> str:
        if not self.after.exists:
            return f"remove {self.path}"
        return f"{'rewrite' if self.before.exists else 'write'} {self.path}"

    def inverse(self) -> FileChange:
        return FileChange(self.path, self.after, self.before)


class FileError(Exception):
    pass


def read_state(path: str | Path) -> FileState:
    """The file as it is now; a symlink is refused (the write would replace the link, and the
    rollback could not tell where it pointed)."""
    p = Path(path)
    try:
        info = p.lstat()
    except FileNotFoundError:
        return ABSENT
    if not stat.S_ISREG(info.st_mode):
        raise FileError(f"{p} is not a regular file (a symlink or a device): not rewritten")
    return FileState(p.read_text(), stat.S_IMODE(info.st_mode))


def write_states(changes: Iterable[FileChange]) -> None:
    """Bring each file to its `after` state; a file already there is left alone."""
    for change in changes:
        if read_state(change.path) != change.after:
            _put(Path(change.path), change.after)


def _put(path: Path, state: FileState) -> None:
    if state.text is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _sync_dir(path.parent)
        return
    _make_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.bridge-migrate")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, state.mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, state.mode)  # not narrowed by the umask
        f.write(state.text.encode())
        f.flush()
        os.fsync(fd)
    os.replace(temporary, path)
    _sync_dir(path.parent)


def _make_dirs(directory: Path) -> None:
    """Missing directories, readable by all as their managers expect: networkd reads its
    drop-in directories as its own user, and the agent's unit runs with UMask=0077 (a 0700
    drop-in directory was silently ignored)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o755)
            os.chmod(d, 0o755)  # not narrowed by the umask


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Writing a whole output directory atomically: readers see the old directory or the new one, never a mix.

    with atomic_directory("router/") as tmp:       # tmp: an empty directory beside router/
        save_file(state, str(tmp / "router.safetensors"))
        (tmp / "router_config.json").write_text(...)
    # only here, after every file was written, does router/ become the new directory

Every file goes into a fresh temporary directory in the target's parent (the same file system, so
the final rename is atomic). If the body raises (a full disk, a failed writer), the temporary
directory is removed and the target is untouched. On success an existing target is renamed aside,
the new directory renamed in, and the old one deleted; if the swap itself fails, the old directory
is put back. Files are flushed to disk before the swap, so a crash right after it cannot leave
empty files behind a new name.

Modes: the new directory and everything in it get what ``mkdir`` / ``open`` give under the user's
umask (0777 / 0666 less the umask, executables keep their x bits); some writers create 0600 files
(safetensors writes through a private temporary file), which would hide a shared router from its
other users. An existing target keeps its own mode.

For any writer of a multi-file result (Router.save, PEFT exports); ``atomic_write_text`` does the
same for a single file (benchmark results). A target that is a symlink is written through: the
directory or file it points to is replaced, the link stays. ``check_output_dir`` and
``check_output_file`` are the checks a command runs on its output before any work: they never let
it replace a directory of the user's that holds something else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write_text", "check_output_dir", "check_output_file",
           "unwritable_reason"]


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it replaces ``target`` (see module docstring).

    Raises NotADirectoryError if ``target`` exists and is not a directory (before yielding), and
    OSError from the file system (the message names the path). Missing parents are created.
    """
    target = _through_link(target)
    parent = target.parent
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(parent, target.name, "tmp")
    os.mkdir(tmp, 0o777)  # the kernel applies the umask: no process-wide os.umask() round trip
    umask = ~stat.S_IMODE(os.stat(tmp).st_mode) & 0o777
    try:
        yield tmp
        _normalise_and_flush(tmp, umask)
        if target.is_dir():
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            old = _fresh_name(parent, target.name, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write one file whole: a temporary file beside ``path``, flushed, then renamed over it."""
    path = _through_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(path.parent, path.name, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # open() applies the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def unwritable_reason(target: str | Path, *, directory: bool) -> str | None:
    """Why ``target`` (a directory or a file) could not be written as above, or None if it can.

    For a check before any work: the result is written beside the target and renamed into place,
    so the nearest existing parent must be a writable directory.
    """
    target = Path(target)
    if directory and target.exists() and not target.is_dir():
        return f"exists and is not a directory: {target}"
    if not directory and target.is_dir():
        return f"{target} is a directory; give a file name"
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {target}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {target}: {parent} is not writable"
    return None


def check_output_dir(target: str | Path, *, kind: str, holds_one: Callable[[Path], bool],
                     overwrite: bool = False) -> Path:
    """Before any work: the directory to write for ``target``, or ValueError saying why it may not be.

    kind names what is written ("a router"); holds_one(directory) tells whether a directory holds
    one. A missing or empty directory may be written; a non-empty one only with ``overwrite`` and
    only when it holds one (so no command ever replaces a directory of other files). A symlink is
    followed (a dangling one is refused); the current directory, or one that contains it, is refused.
    """
    path = _resolved_target(target)
    if path.is_dir() and any(path.iterdir()):
        if not holds_one(path):
            raise ValueError(f"{target} is not empty and does not hold {kind}; refusing to replace it "
                             "(give a new or empty directory)")
        if not overwrite:
            raise ValueError(f"{target} already holds {kind}; give --overwrite to replace it")
    cwd, real = Path.cwd().resolve(), path.resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"{target} is the current directory or contains it; give another directory")
    reason = unwritable_reason(path, directory=True)
    if reason:
        raise ValueError(reason)
    return path


def check_output_file(target: str | Path) -> Path:
    """Before any work: the file to write for ``target`` (a symlink followed), or ValueError why not."""
    path = _resolved_target(target)
    reason = unwritable_reason(path, directory=False)
    if reason:
        raise ValueError(reason)
    return path


def _resolved_target(target: str | Path) -> Path:
    try:
        return _through_link(target)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def _through_link(target: str | Path) -> Path:
    """The absolute path to write for ``target``: a symlink's destination (so the link stays a link)."""
    target = Path(target)
    if target.is_symlink():
        if not target.exists():
            raise FileNotFoundError(f"{target} is a symlink to {os.readlink(target)}, which does not exist")
        return Path(os.path.realpath(target))
    return target.absolute()


def _fresh_name(parent: Path, name: str, kind: str) -> Path:
    # hidden, and named after the target, so a leftover of a killed process is recognisable
    return parent / f".{name}.{uuid.uuid4().hex[:12]}.{kind}"


def _normalise_and_flush(root: Path, umask: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                continue
            os.chmod(path, (0o777 if mode & 0o111 else 0o666) & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

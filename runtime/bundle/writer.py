"""Writing a bundle folder safely: everything goes into a hidden temporary sibling of OUT, the manifest is written
last (it is the commit marker), files are fsynced, and the folder is renamed into place. An interrupted export
or quantization never leaves a half bundle at OUT, and nothing the user had there is lost: a non-empty OUT is
refused unless it is a bundle and ``overwrite`` is set, and the old bundle is deleted only after the new one is in
place. Used by ``edgediff export`` and by every ``edgediff.engines`` command.

A run killed with SIGKILL cleans up nothing, so the names carry the writer's pid and the next run for the same OUT
repairs what a dead writer left: ``.OUT.<pid>.<random>.partial`` (the staging folder) is deleted, and
``.OUT.old-<pid>`` (the previous bundle, moved aside by ``--overwrite``) is put back when the kill came before the
new bundle was in place, or deleted when it came after. Folders of a live writer are left alone."""
from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EdgediffError, OutputExistsError, OutputWriteError
from . import layout
from .manifest import MANIFEST_NAME, Manifest

PARTIAL_SUFFIX = ".partial"
# errors that mean "this output cannot be written here" rather than a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENAMETOOLONG}


def check_output(out: Path, overwrite: bool) -> None:
    """Before any work is done: repair what a killed writer of ``out`` left, then refuse an OUT that holds anything
    but an (overwritable) bundle, or that cannot be written."""
    out = Path(out).expanduser()
    recover(out)
    check_writable(out)  # first: what cannot be looked up (a name too long) cannot be checked below
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
        if not ((out / MANIFEST_NAME).is_file() or (out / layout.MODEL_INDEX).is_file()):
            raise OutputExistsError(f"{out} is not a bundle; --overwrite only replaces bundles, never other folders")


def check_writable(out: Path) -> None:
    """Refuse an OUT whose folder cannot be written (read-only or pseudo file system, no permission) with one line,
    before the work. Tried, not predicted: ``os.access`` says yes to root on /sys and /proc."""
    try:
        os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:  # a name too long, a loop of links: OUT cannot even be looked up
        raise OutputWriteError(f"cannot write {out}: {exc.strerror or exc}; {_hint(exc.errno)}") from None
    where = Path(os.path.abspath(out)).parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent  # staged_bundle makes the missing folders
    if not where.is_dir():
        raise OutputWriteError(f"cannot write {out}: {where} is not a folder; choose another output folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_partial_prefix(out), suffix=PARTIAL_SUFFIX, dir=where))
    except OSError as exc:
        # ENOENT for a folder that exists: /proc and the like, which make no new entries
        cause = "it accepts no new entries" if exc.errno == errno.ENOENT else exc.strerror or exc
        raise OutputWriteError(f"cannot write {out}: {where}: {cause}; {_hint(exc.errno)}") from None


@contextmanager
def staged_bundle(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder to fill; on normal exit it must hold the manifest, and it replaces ``out``.
    On an exception the temporary folder is removed and ``out`` is untouched. A write that fails for want of
    space or permission (in the body too) is one OutputWriteError naming the file and the cause."""
    out = Path(out).expanduser()
    check_output(out, overwrite)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), suffix=PARTIAL_SUFFIX, dir=out.parent))
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise RuntimeError(f"internal: {tmp} has no {MANIFEST_NAME}; nothing was committed")
        apply_umask(tmp)
        fsync_tree(tmp)
        move_into_place(tmp, out)
    except OSError as exc:
        if isinstance(exc, EdgediffError) or exc.errno not in WRITE_ERRNOS or not _writing(out, exc):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        raise OutputWriteError(f"cannot write {out}: {where}{exc.strerror or exc}; {_hint(exc.errno)}; nothing "
                               f"was written to {out}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _writing(out: Path, exc: OSError) -> bool:
    """Whether ``exc`` is about writing OUT (its staging folder, OUT, the folders above it), not about reading
    the source, whose errors are not the output's to explain."""
    target = os.path.abspath(out)
    stage = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.")
    names = [os.path.abspath(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, os.PathLike))]
    return not names or any(n == target or n.startswith(stage) or target.startswith(n + os.sep) for n in names)


def _hint(code: int | None) -> str:
    return {errno.ENOSPC: "free some space or choose another output folder",
            errno.EDQUOT: "free some space or choose another output folder",
            errno.EFBIG: "the file system or a file size limit (ulimit -f) refuses a file this large",
            errno.ENAMETOOLONG: "choose a shorter output path"}.get(code, "choose a writable output folder")


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for fn in files:
            with open(os.path.join(dirpath, fn), "rb") as f:
                os.fsync(f.fileno())


def apply_umask(root: Path) -> None:
    """Give the staged tree the modes any tool would create: mkdtemp makes the folder 0700 and copies keep the
    parent bundle's modes, whatever the user's umask says."""
    mask = current_umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for fn in files:
            path = os.path.join(dirpath, fn)
            if not os.path.islink(path):  # chmod follows links: never touch what one points to
                os.chmod(path, 0o666 & ~mask)


def current_umask() -> int:
    try:  # Linux >= 4.7 shows it; reading it otherwise means setting it, which other threads could see
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. An existing bundle at ``out`` (only with overwrite) is moved aside first and
    deleted only after the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- what a killed writer left ----------------------------------------------------------------------------------
def recover(out: Path) -> None:
    """Repair what dead writers of ``out`` left beside it (see the module doc). A restored bundle is announced on
    stderr, whoever the caller: the user must learn that OUT is the old bundle, not a new one."""
    out = Path(out).expanduser()
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:  # an unreadable parent: check_writable says so
        return
    olds = sorted((p for p in siblings if _dead_writer(_old_pid(p, out))), key=lambda p: p.stat().st_mtime)
    if olds and (not os.path.lexists(out) or _empty_dir(out)):
        # the kill came between moving the old bundle aside and renaming the new one in: put the old one back
        try:
            os.replace(olds[-1], out)
        except OSError as exc:
            raise OutputWriteError(f"{out} is missing and its previous bundle is in {olds[-1]}, left by a killed "
                                   f"--overwrite; restoring it failed ({exc.strerror or exc}): rename it back to "
                                   f"{out.name}") from None
        print(f"edgediff: restored {out} from {olds[-1].name}, left by an --overwrite that was killed before the "
              "new bundle was in place", file=sys.stderr)
        olds = olds[:-1]
    for p in olds:  # the new bundle is in place: finish deleting the old one
        shutil.rmtree(p, ignore_errors=True)
    for p in siblings:
        if _dead_writer(_partial_pid(p, out)):
            shutil.rmtree(p, ignore_errors=True)


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def _partial_prefix(out: Path) -> str:
    return f".{Path(out).name}.{os.getpid()}."


def _partial_pid(p: Path, out: Path) -> int | None:
    """The writer pid in ``.OUT.<pid>.<random>.partial`` (mkdtemp's random part has no dot), else None."""
    head, name = f".{out.name}.", p.name
    if not (name.startswith(head) and name.endswith(PARTIAL_SUFFIX)):
        return None  # decided from the name alone: other entries are never looked at (/proc has unreadable ones)
    parts = name[len(head):-len(PARTIAL_SUFFIX)].split(".")
    ok = len(parts) == 2 and parts[0].isdigit() and p.is_dir() and not p.is_symlink()
    return int(parts[0]) if ok else None


def _old_pid(p: Path, out: Path) -> int | None:
    head, name = f".{out.name}.old-", p.name
    if not (name.startswith(head) and name[len(head):].isdigit()) or not p.is_dir() or p.is_symlink():
        return None
    return int(name[len(head):])


def _dead_writer(pid: int | None) -> bool:
    """True when no process has this pid (on this machine). A reused pid keeps the folder: only ever too careful."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive, someone else's
        return False
    return False

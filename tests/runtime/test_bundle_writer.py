"""bundle.writer: what a killed writer left is repaired by the next run for the same OUT (and only for it, and
only when the writer is dead); an output that cannot be written is one line; the umask is honoured."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgediff.bundle.writer import check_output, current_umask, staged_bundle
from edgediff.errors import OutputWriteError


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a kill -9 leaves in the folder names."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _bundle(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "edgediff.json").write_text(text)
    return path


def test_a_kill_between_the_overwrite_renames_is_restored(tmp_path, dead_pid, capsys):
    out = tmp_path / "out"
    # `export --overwrite` killed after moving the old bundle aside and before renaming the new one in
    _bundle(tmp_path / f".out.old-{dead_pid}", "old")
    _bundle(tmp_path / f".out.{dead_pid}.k1vncxs5.partial", "new, complete but never renamed in")
    check_output(out, overwrite=True)
    assert (out / "edgediff.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    err = capsys.readouterr().err
    assert f"restored {out} from .out.old-{dead_pid}" in err and len(err.strip().splitlines()) == 1


def test_a_kill_after_the_new_bundle_was_renamed_in_finishes_the_delete(tmp_path, dead_pid, capsys):
    out = _bundle(tmp_path / "out", "new")
    _bundle(tmp_path / f".out.old-{dead_pid}", "old")
    check_output(out, overwrite=True)
    assert (out / "edgediff.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert capsys.readouterr().err == ""


def test_a_live_writer_and_other_outputs_are_left_alone(tmp_path, dead_pid):
    out = tmp_path / "out"
    mine = os.getpid()  # alive: another export of the same OUT in progress
    keep = [f".out.old-{mine}", f".out.{mine}.abcd1234.partial",
            f".out.x.{dead_pid}.abcd1234.partial",  # OUT "out.x"'s, not OUT "out"'s
            f".other.{dead_pid}.abcd1234.partial", ".out.abcd1234.partial"]  # no pid: an older edgediff's
    for name in keep:
        _bundle(tmp_path / name, "x")
    check_output(out, overwrite=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_rerun_sweeps_its_own_stale_partials(tmp_path, dead_pid):
    out = tmp_path / "out"
    _bundle(tmp_path / f".out.{dead_pid}.abcd1234.partial", "x")
    with staged_bundle(out, overwrite=False) as tmp:
        assert tmp.name.startswith(f".out.{os.getpid()}.") and tmp.name.endswith(".partial")
        (tmp / "edgediff.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("folder", ["/sys", "/proc/self"])
def test_an_unwritable_folder_is_refused_before_the_work(folder):
    # these refuse new entries even to root (for whom os.access always says yes)
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder} on this system")
    with pytest.raises(OutputWriteError, match=rf"cannot write {folder}/edgediff-test/out: {folder}: .*; choose a "
                                               "writable output folder$"):
        check_output(Path(folder) / "edgediff-test" / "out", overwrite=False)


@pytest.mark.parametrize("name", ["x" * 300, "x" * 300 + "/out"])
def test_a_name_too_long_is_refused_before_the_work(tmp_path, name):
    with pytest.raises(OutputWriteError, match="File name too long; choose a shorter output path"):
        check_output(tmp_path / name, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError) as info:
        with staged_bundle(out, overwrite=False) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "unet" / "model.onnx"))
    msg = str(info.value)
    assert msg.startswith(f"cannot write {out}: {tmp / 'unet' / 'model.onnx'}: No space left on device; free some")
    assert "\n" not in msg and list(tmp_path.iterdir()) == []


def test_a_source_read_error_is_not_called_a_write_error(tmp_path):
    with pytest.raises(PermissionError):
        with staged_bundle(tmp_path / "out", overwrite=False):
            raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/source/unet/model.onnx")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_the_bundle_honours_the_umask(tmp_path, umask):
    src = tmp_path / "private.json"
    src.write_text("{}")
    src.chmod(0o600)  # copies kept the source's mode
    saved = os.umask(umask)
    try:
        assert current_umask() == umask
        with staged_bundle(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "unet").mkdir()
            shutil.copy2(src, tmp / "unet" / "config.json")
            (tmp / "edgediff.json").write_text("{}")
    finally:
        os.umask(saved)
    out = tmp_path / "out"
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # mkdtemp made it 0700
    assert oct((out / "unet").stat().st_mode & 0o777) == oct(0o777 & ~umask)
    for f in ("edgediff.json", "unet/config.json"):
        assert oct((out / f).stat().st_mode & 0o777) == oct(0o666 & ~umask), f

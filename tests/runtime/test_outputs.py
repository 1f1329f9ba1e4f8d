"""Output files: checked before the work, all-or-nothing, never clobbering (runtime/outputs.py)."""
from __future__ import annotations

import errno
import os

import pytest

from edgediff import outputs
from edgediff.errors import OutputExistsError, OutputWriteError


def test_write_all_leaves_nothing_when_one_file_fails(tmp_path, monkeypatch):
    paths = [tmp_path / f"o-{k}.png" for k in range(4)]
    real_link = os.link
    count = [0]

    def link(src, dst):  # the disk fills up at the fourth image
        count[0] += 1
        if count[0] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_link(src, dst)

    monkeypatch.setattr(outputs.os, "link", link)
    with pytest.raises(OutputWriteError, match="No space left on device; nothing was written"):
        outputs.write_all(paths, [b"a", b"b", b"c", b"d"], overwrite=False)
    assert list(tmp_path.iterdir()) == []  # neither the three placed files nor any temp file


def test_write_all_never_replaces_a_file_that_appeared(tmp_path):
    (tmp_path / "o-1.png").write_bytes(b"theirs")
    with pytest.raises(OutputExistsError):
        outputs.write_all([tmp_path / "o-0.png", tmp_path / "o-1.png"], [b"a", b"b"], overwrite=False)
    assert (tmp_path / "o-1.png").read_bytes() == b"theirs" and not (tmp_path / "o-0.png").exists()


def test_check_writable_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits; /proc below still covers a refused write
            pytest.skip("running as root: permission bits do not stop writes")
        with pytest.raises(OutputWriteError, match="cannot write to"):
            outputs.check_writable([ro / "o.png"], overwrite=False)
    finally:
        ro.chmod(0o700)


def test_check_writable_refuses_a_pseudo_file_system():
    with pytest.raises(OutputWriteError, match="cannot write to /proc"):
        outputs.check_writable([outputs.Path("/proc/o.png")], overwrite=False)

"""`ldm_lite.runs.written_then_renamed`, the one write-then-rename helper beside `atomic_save`: readers see the old
file or the whole new one, never half; a failed write leaves the old file and no temporary behind."""
import os

import pytest

from ldm_lite.runs import written_then_renamed


def test_the_new_file_replaces_the_old_one_only_when_complete(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    with written_then_renamed(path) as partial:
        assert partial == tmp_path / f"cache.bin.{os.getpid()}.tmp"  # per process: ranks never share one
        partial.write_bytes(b"new")
        assert path.read_bytes() == b"old"
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with written_then_renamed(path) as partial:
            partial.write_bytes(b"ne")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]

"""What a failed checkpoint or export write says: its real cause and the fix for that cause.
"Free space" only for a full disk; a permission problem asks for access; anything else is
quoted as it is. And a flax checkpoint that fails to read for a reason other than damage is
never called damaged."""

from __future__ import annotations

import errno

import pytest

from kandinsky_common import checkpoints as ck


@pytest.mark.parametrize(
    "error, reason, fix",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left", "free space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left", "free space"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied", "writable"),
        (OSError(errno.EROFS, "Read-only file system"), "permission denied", "writable"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error", "fix that"),
        (ValueError("Checkpoint path should be absolute"), "should be absolute", "fix that"),
    ],
)
def test_write_failure_names_the_real_cause(tmp_path, error, reason, fix):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / ck.STATE_FILE).write_text("{}")
    line = str(ck.write_failed(tmp_path / "checkpoint-4", error, "torch"))
    assert reason in line and fix in line and ", then rerun with --resume_from_checkpoint" in line
    assert "checkpoint-2 is the newest complete checkpoint" in line
    if fix != "free space":
        assert "space" not in line


def test_a_full_disk_seen_only_by_the_free_space_of_torch_save(tmp_path, monkeypatch):
    """torch.save reports a full disk without an errno: the free space decides, and only then."""
    error = RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed")
    usage = type("usage", (), {"free": 0})
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda _: usage)
    assert "no space left" in str(ck.write_failed(tmp_path / "checkpoint-1", error))
    other = ValueError("something else")
    assert "no space left" not in str(ck.write_failed(tmp_path / "checkpoint-1", other))

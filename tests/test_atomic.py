"""Atomic writes: all or nothing, the user's umask, and no leftovers of an interrupted write."""

import os

import pytest

from corda_vl.atomic import atomic_dir, atomic_file, remove_leftovers


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_results_follow_the_umask(tmp_path, umask_022):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700


def test_a_failed_block_leaves_the_previous_version(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    """A kill -9 inside the block skips every cleanup: what it leaves must not pile up."""
    for name in (".out.tmp-abc", ".out.old-def"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"0" * 100)
    (tmp_path / "log.jsonl.xyz.tmp").write_text("half")
    (tmp_path / ".other.tmp-1").mkdir()  # another target's: not ours to remove
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "v").write_text("1")
    with atomic_file(tmp_path / "log.jsonl") as tmp:
        tmp.write_text("whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "log.jsonl", "out"]
    assert remove_leftovers(tmp_path / "out") == []

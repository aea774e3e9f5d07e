"""`madlens cache list | size | clear`, on a cache made in a temporary MADLENS_HOME."""

import os
import time

import pytest

from madlens import cache


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "home"))
    old = cache.load_or_compute(cache.folder("gcg") / "old.json", lambda: "x" * 2998)
    assert old
    cache.load_or_build_dir(
        cache.folder("adapters") / "a1", lambda tmp: (tmp / "w.bin").write_bytes(b"0" * 5000)
    )
    ten_days = time.time() - 10 * 86400
    os.utime(cache.folder("gcg") / "old.json", (ten_days, ten_days))
    return tmp_path / "home"


def test_list_and_size_show_every_item_with_its_size(home, run_cli):
    code, out, err = run_cli("cache", "list")
    assert code == 0 and not err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["adapters", "5.0", "kB"]
    assert lines[1].split()[:3] == ["gcg", "3.0", "kB"]
    assert lines[-1] == f"2 item(s), 8.0 kB in {home}"
    code, out, _ = run_cli("cache", "size")
    assert code == 0
    assert [line.split()[:3] for line in out.strip().splitlines()] == [
        ["adapters", "5.0", "kB"], ["gcg", "3.0", "kB"], ["total", "8.0", "kB"]
    ]  # fmt: skip


def test_clear_older_than_frees_only_what_was_not_used(home, run_cli):
    code, out, _ = run_cli("cache", "clear", "--older-than", "7")
    assert code == 0 and out.strip() == "removed 1 item(s), 3.0 kB"
    assert not (home / "gcg" / "old.json").exists() and (home / "adapters" / "a1").is_dir()
    code, out, _ = run_cli("cache", "clear")
    assert code == 0 and out.strip() == "removed 1 item(s), 5.0 kB"
    assert cache.entries() == []


def test_bad_cache_arguments_are_one_line(home, run_cli):
    code, _, err = run_cli("cache", "clear", "--older-than", "-1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("cache", "size", "--kind", "nope")
    assert code == 2 and err.strip().startswith("error: no cache kind 'nope'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["..", ".", "/", "gcg/..", "../home", ""])
def test_a_kind_is_a_plain_name_inside_the_cache(home, run_cli, kind):
    outside = home.parent / "keep.txt"
    outside.write_text("not cache")
    code, _, err = run_cli("cache", "clear", "--kind", kind)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert outside.read_text() == "not cache" and (home / "gcg" / "old.json").exists()
    with pytest.raises(ValueError, match="plain folder name"):
        cache.clear(kind=kind)

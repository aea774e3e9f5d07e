"""The one cache: keys, atomic load-or-compute, listing and clearing, and the activation
store's behaviour when a run is interrupted."""

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from madlens import cache
from madlens.activations import capture, extract


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_home_follows_the_environment(home):
    assert cache.home() == home
    assert cache.folder("adapters") == home / "adapters"


def test_key_is_a_sha256_prefix_of_the_named_parts():
    parts = {"model": "abc", "n": 3, "data": [["x", 1]]}
    expected = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    assert cache.key(**parts) == expected[: cache.KEY_LENGTH]
    assert len(cache.key(a=1)) == cache.KEY_LENGTH == 24
    assert cache.key(a=1, b=2) == cache.key(b=2, a=1)
    assert cache.key(a=1) != cache.key(b=1)


def test_key_reads_arrays_by_content():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert cache.key(x=x) == cache.key(x=x.copy()) == cache.key(x=torch.from_numpy(x.copy()))
    y = x.copy()
    y[2, 3] += 1
    assert cache.key(x=x) != cache.key(x=y)
    assert cache.key(x=x) != cache.key(x=x.astype(np.float64))
    assert cache.key(x=x) != cache.key(x=x.reshape(4, 3))


def test_load_or_compute_computes_once(home):
    calls = []

    def compute():
        calls.append(1)
        return {"w": np.arange(5.0)}

    path = cache.folder("things") / "a.safetensors"
    first = cache.load_or_compute(path, compute)
    second = cache.load_or_compute(path, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["w"], second["w"])
    assert cache.load_or_compute(home / "x.json", lambda: [1, "two"]) == [1, "two"]
    assert cache.load_or_compute(home / "x.json", lambda: "never") == [1, "two"]
    as_torch = cache.load_or_compute(path, compute, as_torch=True)
    assert isinstance(as_torch["w"], torch.Tensor)


def test_an_interrupted_compute_leaves_nothing_behind(home):
    path = home / "kind" / "r.json"

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.load_or_compute(path, boom)
    assert not path.exists()
    # a write that fails half way (the value cannot be serialised) leaves no partial file
    with pytest.raises(TypeError):
        cache.load_or_compute(path, lambda: {"x": object()})
    assert list(path.parent.iterdir()) == []
    assert cache.load_or_compute(path, lambda: 7) == 7


def test_load_or_build_dir_is_all_or_nothing(home):
    target = home / "adapters" / "k"

    def half(tmp):
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.load_or_build_dir(target, half)
    assert not target.exists() and list(target.parent.iterdir()) == []
    built = cache.load_or_build_dir(target, lambda tmp: (tmp / "a.txt").write_text("b"))
    assert (built / "a.txt").read_text() == "b"
    cache.load_or_build_dir(target, lambda tmp: (tmp / "a.txt").write_text("c"))
    assert (built / "a.txt").read_text() == "b"


def test_entries_and_clear_older_than(home):
    old = cache.folder("gcg") / "old.json"
    new = cache.folder("gcg") / "new.json"
    cache.load_or_compute(old, lambda: "x" * 1000)
    cache.load_or_compute(new, lambda: "y")
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    listed = {e.path.name: e for e in cache.entries()}
    assert listed["old.json"].size == old.stat().st_size == 1002
    assert listed["old.json"].kind == "gcg"
    removed = cache.clear(older_than_days=7)
    assert [e.path.name for e in removed] == ["old.json"]
    assert not old.exists() and new.exists()
    cache.clear()
    assert cache.entries() == []


def test_a_cache_hit_counts_as_use(home):
    path = cache.folder("gcg") / "a.json"
    cache.load_or_compute(path, lambda: 1)
    week_ago = time.time() - 8 * 86400
    os.utime(path, (week_ago, week_ago))
    cache.load_or_compute(path, lambda: 2)
    assert cache.clear(older_than_days=7) == []


def test_interrupted_activation_capture_is_not_read_as_complete(tiny, home, monkeypatch):
    texts = [f"text number {i}" for i in range(6)]
    hook = "blocks.0.hook_resid_post"
    real = capture._compute_chunk
    calls = []

    def dies_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(capture, "CHUNK", 3)
    monkeypatch.setattr(capture, "_compute_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny, texts, [hook], "last", progress=False)
    entry = next((home / "activations").iterdir())
    assert [p.name for p in entry.iterdir()] == ["meta.json"]  # no hook folder, no partial
    monkeypatch.setattr(capture, "_compute_chunk", real)
    cached = extract(tiny, texts, [hook], "last", progress=False)
    fresh = extract(tiny, texts, [hook], "last", cache=False, progress=False)
    np.testing.assert_array_equal(cached[hook], fresh[hook])

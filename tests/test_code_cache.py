"""agent/code_cache.py: translated blocks kept per code, merged, bounded in bytes (LRU)."""

from __future__ import annotations

from agent.code_cache import CodeCache, cache_key


def test_put_merges_and_get_returns_what_was_kept() -> None:
    c = CodeCache()
    k = cache_key("tag", 0, b"code", 1 << 20)
    assert c.get(k) == []
    c.put(k, [(0, b"aa"), (8, b"bb")])
    c.put(k, [(8, b"BBB"), (16, b"cc")])
    assert sorted(c.get(k)) == [(0, b"aa"), (8, b"BBB"), (16, b"cc")]
    assert c.size_bytes == 2 + 3 + 2


def test_the_key_tells_code_tag_place_and_ram_size_apart() -> None:
    c = CodeCache()
    c.put(cache_key("tag", 0, b"code", 1 << 20), [(0, b"x")])
    for other in (cache_key("tag2", 0, b"code", 1 << 20), cache_key("tag", 4096, b"code", 1 << 20),
                  cache_key("tag", 0, b"codf", 1 << 20), cache_key("tag", 0, b"code", 2 << 20)):
        assert c.get(other) == []


def test_the_least_recently_used_code_goes_first_when_full() -> None:
    c = CodeCache(max_bytes=10)
    a, b, d = (cache_key("t", 0, bytes([i]), 1) for i in range(3))
    c.put(a, [(0, b"1234")])
    c.put(b, [(0, b"1234")])
    assert c.get(a)  # a used last: b is the oldest now
    c.put(d, [(0, b"1234")])
    assert c.get(b) == [] and c.get(a) and c.get(d)
    assert c.size_bytes == 8

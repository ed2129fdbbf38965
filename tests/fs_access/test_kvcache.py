"""KVCacheStore: content-addressed put/get/exists/remove, batched get, LRU size cap, corrupt or lost blocks read as
misses (never wrong data); on the real cluster and on a local directory."""

from __future__ import annotations

import numpy as np
import pytest

from seekstack.fs.kvcache import HEADER_SIZE, KVCacheStore, block_keys, prefix_key


@pytest.fixture
def store(client, uniq):
    s = KVCacheStore(client, uniq + "/kv", capacity_bytes=1 << 20)
    yield s
    s.close()


def _blocks(rng, n, size):
    return [rng.standard_normal(size // 4).astype(np.float32) for _ in range(n)]


def test_block_keys_follow_the_prefix():
    toks = list(range(1000, 1050))
    keys = block_keys(toks, 16)
    assert len(keys) == 3  # 50 tokens: 3 full blocks, the tail is not a block
    assert keys == block_keys(toks[:48] + [7, 7], 16)  # same prefix, same keys
    other = block_keys([1] + toks[1:], 16)
    assert all(a != b for a, b in zip(keys, other))  # a change in block 0 changes every later key
    assert keys[0] == prefix_key(toks[:16]) and keys[1] == prefix_key(toks[16:32], keys[0])
    with pytest.raises(ValueError, match="block_tokens"):
        block_keys(toks, 0)
    with pytest.raises(ValueError, match="tokens"):
        prefix_key(["a"])


def test_put_get_exists_remove(store, rng):
    keys = block_keys(rng.integers(0, 50000, 16 * 5).tolist(), 16)
    blocks = _blocks(rng, 5, 4096 + 12)
    for k, b in zip(keys[:4], blocks):
        assert store.put(k, b)
    got = store.get_many(keys)
    for b, g in zip(blocks[:4], got[:4]):
        assert g is not None and np.array_equal(np.frombuffer(g, np.float32), b)
    assert got[4] is None
    assert store.exists(keys[0]) and not store.exists(keys[4])
    assert store.remove(keys[1]) and not store.remove(keys[1])
    assert store.get(keys[1]) is None
    assert store.stats["hits"] == 4 and store.stats["misses"] == 2
    assert len(store) == 3
    # a second store on the same root (another process, a restart) finds the blocks
    again = KVCacheStore(store.client, store.root, capacity_bytes=1 << 20)
    assert len(again) == 3 and again.used_bytes == store.used_bytes
    assert np.array_equal(np.frombuffer(again.get(keys[2]), np.float32), blocks[2])
    again.close()
    with pytest.raises(ValueError, match="key"):
        store.put("not-hex", b"x")
    with pytest.raises(ValueError, match="key"):
        store.get_many(["ABCDEF0123456789"])  # upper case is not a key we produce


def test_lru_size_cap(client, uniq, rng):
    size = 10_000
    cap = 5 * (size + HEADER_SIZE)
    s = KVCacheStore(client, uniq + "/lru", capacity_bytes=cap)
    keys = [prefix_key([i]) for i in range(8)]
    data = [rng.bytes(size) for _ in keys]
    for k, d in zip(keys[:5], data):
        s.put(k, d)
    assert s.get(keys[0]) == data[0]  # 0 becomes the most recently used
    s.put(keys[5], data[5])  # evicts 1, the least recently used
    s.put(keys[6], data[6])  # evicts 2
    assert s.used_bytes <= cap and len(s) == 5
    present = [s.exists(k) for k in keys[:7]]
    assert present == [True, False, False, True, True, True, True]
    assert s.stats["evictions"] == 2
    assert not s.put(keys[7], rng.bytes(cap))  # larger than the whole cache: refused, nothing evicted
    assert len(s) == 5
    assert s.gc(target_bytes=2 * (size + HEADER_SIZE)) == 3
    assert [s.exists(k) for k in (keys[0], keys[5], keys[6])] == [False, True, True]
    s.close()


def test_corrupt_and_lost_blocks_are_misses(store, rng):
    keys = [prefix_key([i, 99]) for i in range(4)]
    vals = [rng.bytes(3000 + i) for i in range(4)]
    for k, v in zip(keys, vals):
        store.put(k, v)
    path = store._path
    with store.client.open(path(keys[0]), "r+b") as f:  # flip one payload byte
        b = f.pread(1, HEADER_SIZE + 1234)
        f.pwrite(bytes([b[0] ^ 0x40]), HEADER_SIZE + 1234)
    store.client.truncate(path(keys[1]), HEADER_SIZE + 10)  # truncated block
    store.client.unlink(path(keys[2]))  # lost block
    store.client.write_bytes(path(keys[3]) + "x", b"")  # unrelated junk does not matter
    got = store.get_many(keys)
    assert got == [None, None, None, vals[3]]
    assert store.stats["corrupt"] == 2
    assert not store.exists(keys[0]) and not store.exists(keys[1])  # corrupt blocks are dropped
    # a block written under another key's name fails the key check
    store.client.rename(path(keys[3]), path(keys[0]))
    assert store.get(keys[0]) is None

"""The RPC framing: frames split at any byte boundary or packed many to a read parse back exactly; payloads land in
the caller's buffer with their CRC computed on arrival; many concurrent calls (small frames coalesced into one
send) and sendfile replies over real 127.0.0.1 connections; the CRC-32 helper against zlib."""

from __future__ import annotations

import asyncio
import os
import random
import zlib

import pytest

from seekstack.fs.crc import crc32
from seekstack.fs.protocol import FileSpan, FrameProtocol, RpcClient, RpcServer, encode_frame


class _Transport:
    """The two transport calls the parser makes (it only reads what it is handed)."""

    def close(self):
        raise AssertionError("the parser gave up on a well-formed stream")

    def get_extra_info(self, name):
        return None


def _stream(frames) -> bytes:
    return b"".join(bytes(b"".join(encode_frame(h, p)[:2]) + p) for h, p in frames)


@pytest.mark.parametrize("sink", [False, True])
def test_frames_parse_back_from_any_split(seed, sink):
    rng = random.Random(seed)
    sizes = [0, 1, 100, (1 << 16) - 1, 1 << 16, 70_000, 300_000]
    frames = [({"i": i, "r": {"n": n}}, rng.randbytes(n)) for i, n in enumerate(rng.choices(sizes, k=40))]
    stream = _stream(frames)
    sinks = {h["i"]: memoryview(bytearray(len(p) + 5)) for h, p in frames}
    got = []
    proto = FrameProtocol(lambda h, p: got.append((h, bytes(p), p)))
    if sink:
        proto.sink = lambda h, n: sinks[h["i"]]
    proto.connection_made(_Transport())
    pos = 0
    while pos < len(stream):  # pieces from 1 byte to 200 KiB: headers and payloads cut everywhere
        buf = proto.get_buffer(-1)
        n = min(len(buf), len(stream) - pos, rng.choice([1, 7, 4096, 65536, 200_000]))
        buf[:n] = stream[pos : pos + n]
        proto.buffer_updated(n)
        pos += n
    assert [(h["i"], b) for h, b, _ in got] == [(h["i"], p) for h, p in frames]
    for (h, _, raw), (_, p) in zip(got, frames):
        if sink and p:  # received in place, CRC computed on the way in
            assert raw.obj is sinks[h["i"]].obj and h["crc_rx"] == zlib.crc32(p)
        else:
            assert "crc_rx" not in h


def test_crc32_matches_zlib(seed):
    rng = random.Random(seed)
    for n in (0, 1, 4095, 4096, 100_000, 1 << 20):
        data = rng.randbytes(n)
        assert crc32(data) == zlib.crc32(data)
        assert crc32(memoryview(data)[3:]) == zlib.crc32(data[3:])
        assert crc32(bytearray(data)[n // 2 :], crc32(data[: n // 2])) == zlib.crc32(data)


def test_concurrent_calls_sinks_and_sendfile_over_loopback(tmp_path, seed):
    rng = random.Random(seed)
    blob = rng.randbytes(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    released = []

    async def echo(args, payload):
        return {"n": len(payload)}, bytes(payload)

    async def span(args, payload):
        fd = os.open(path, os.O_RDONLY)
        return {"crc": zlib.crc32(blob[args["off"] : args["off"] + args["n"]])}, FileSpan(
            fd, args["off"], args["n"], release=lambda: (os.close(fd), released.append(1))
        )

    async def main():
        server = RpcServer({"echo": echo, "span": span}, token="t")
        port = await server.start("127.0.0.1", 0)
        client = RpcClient("127.0.0.1", port, "t")
        try:
            payloads = [rng.randbytes(rng.choice([0, 10, 5000, 1 << 16, 500_000])) for _ in range(60)]
            replies = await asyncio.gather(*(client.call_data("echo", p) for p in payloads))
            assert [bytes(out) for _, out in replies] == payloads
            assert [r["n"] for r, _ in replies] == [len(p) for p in payloads]
            dests = [memoryview(bytearray(1 << 20)) for _ in range(6)]
            offs = [rng.randrange(len(blob) - (1 << 20)) for _ in dests]
            got = await asyncio.gather(
                *(client.call_data("span", into=d, off=o, n=1 << 20) for d, o in zip(dests, offs))
            )
            for (r, out), d, o in zip(got, dests, offs):
                assert out.obj is d.obj and bytes(out) == blob[o : o + (1 << 20)]
                assert r["crc_rx"] == r["crc"]  # computed by the client as the bytes arrived
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())
    assert len(released) == 6  # every file span was released once sent

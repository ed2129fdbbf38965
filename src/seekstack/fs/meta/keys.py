"""The 3FS key layout: 4-byte prefixes, so every record kind is its own key range.

- `INOD` + inode id (8 bytes little-endian, as 3FS does to spread consecutive ids): the inode.
- `DENT` + parent id (8 bytes big-endian) + name: a directory is one contiguous range, so listdir is a range scan.
- `INOS` + inode id (8 bytes big-endian) + session id: write sessions of one file are one range.
- `SING` + name: single values (inode-id allocator, chain allocation counter).
- `IDEM` + request id: the result of a mutating request, so a retried request is not applied twice.
"""

from __future__ import annotations

INOD, DENT, INOS, SING, IDEM = b"INOD", b"DENT", b"INOS", b"SING", b"IDEM"


def inode_key(ino: int) -> bytes:
    return INOD + ino.to_bytes(8, "little")


def dent_prefix(parent: int) -> bytes:
    return DENT + parent.to_bytes(8, "big")


def dent_key(parent: int, name: str) -> bytes:
    return dent_prefix(parent) + name.encode("utf-8", "surrogateescape")


def session_prefix(ino: int) -> bytes:
    return INOS + ino.to_bytes(8, "big")


def session_key(ino: int, session: str) -> bytes:
    return session_prefix(ino) + session.encode()


def single_key(name: str) -> bytes:
    return SING + name.encode()


def idem_key(rid: str) -> bytes:
    return IDEM + rid.encode()

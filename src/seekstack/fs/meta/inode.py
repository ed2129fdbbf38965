"""Inode records (JSON values under `INOD` keys) and the stat view clients see."""

from __future__ import annotations

import json
import stat as _stat
import time
from dataclasses import asdict, dataclass, field

FILE, DIR, SYMLINK = "file", "dir", "symlink"
_IFMT = {FILE: _stat.S_IFREG, DIR: _stat.S_IFDIR, SYMLINK: _stat.S_IFLNK}


@dataclass
class Inode:
    id: int
    type: str
    mode: int  # permission bits only (incl. setuid/setgid/sticky); the type lives in `type`
    uid: int
    gid: int
    nlink: int = 1
    atime: float = field(default_factory=time.time)
    mtime: float = 0.0
    ctime: float = 0.0
    length: int = 0  # files: bytes; symlinks: len(target)
    layout: dict | None = None  # files: Layout.to_dict()
    parent: int = 0  # dirs: for ".." and the rename loop check
    target: str = ""  # symlinks
    dir_layout: dict | None = None  # dirs: {"chunk_size", "stripe"} inherited by new files and subdirs

    def __post_init__(self):
        self.mtime = self.mtime or self.atime
        self.ctime = self.ctime or self.atime

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Inode:
        return cls(**json.loads(raw))

    def stat(self) -> dict:
        return {
            "ino": self.id,
            "type": self.type,
            "mode": _IFMT[self.type] | self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "nlink": self.nlink,
            "size": self.length,
            "atime": self.atime,
            "mtime": self.mtime,
            "ctime": self.ctime,
        }

    def touch(self, now: float | None = None):
        self.mtime = self.ctime = now or time.time()

"""File layout: chunk size plus a stripe over chains, chosen by a seeded shuffle that is fixed forever.

3FS learned (deepseek-ai/3FS#368) that a compiler-dependent `std::shuffle` silently changes chunk placement, so
the shuffle here is spelled out: Fisher-Yates driven by SplitMix64, identified by `SHUFFLE_V1`. A new algorithm
must get a new version number; stored layouts keep theirs.

>>> lay = Layout(chunk_size=1 << 20, chains=[1, 2, 3, 4], stripe=2, base=1, seed=7)
>>> lay.chain_of(0) in (2, 3)
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SHUFFLE_V1 = 1
_MASK = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step: returns (new_state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


def shuffle_v1(items: list[int], seed: int) -> list[int]:
    """Deterministic Fisher-Yates: for i from n-1 down to 1, swap i with (splitmix64 output mod (i+1))."""
    out = list(items)
    state = seed & _MASK
    for i in range(len(out) - 1, 0, -1):
        state, r = splitmix64(state)
        j = r % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


@dataclass
class Layout:
    """`chains` is the chain table (ids) at creation; the stripe is `stripe` consecutive chains from `base`
    (wrapping), shuffled with `seed` by shuffle version `shuffle`."""

    chunk_size: int
    chains: list[int]
    stripe: int
    base: int = 0
    seed: int = 0
    shuffle: int = SHUFFLE_V1
    _stripe_chains: list[int] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size must be a positive power of two, got {self.chunk_size}")
        if not self.chains:
            raise ValueError("chains: the chain table is empty")
        if not 1 <= self.stripe <= len(self.chains):
            raise ValueError(f"stripe must be in [1, {len(self.chains)}], got {self.stripe}")
        if self.shuffle != SHUFFLE_V1:
            raise ValueError(f"shuffle: unknown shuffle version {self.shuffle}")

    def stripe_chains(self) -> list[int]:
        if not self._stripe_chains:
            n = len(self.chains)
            picked = [self.chains[(self.base + k) % n] for k in range(self.stripe)]
            self._stripe_chains = shuffle_v1(picked, self.seed)
        return self._stripe_chains

    def chain_of(self, chunk_index: int) -> int:
        return self.stripe_chains()[chunk_index % self.stripe]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_stripe_chains")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(**{k: v for k, v in d.items() if not k.startswith("_")})


def chunk_id(inode: int, index: int, tenant: int = 0, track: int = 0) -> str:
    """16-byte chunk id, big-endian tenant(1) reserved(1) inode(8) track(2) index(4), as hex: a file's chunks are
    one contiguous, ordered key range."""
    return (
        tenant.to_bytes(1, "big")
        + b"\0"
        + inode.to_bytes(8, "big")
        + track.to_bytes(2, "big")
        + index.to_bytes(4, "big")
    ).hex()


def parse_chunk_id(cid: str) -> tuple[int, int]:
    """(inode, index) of a chunk id."""
    b = bytes.fromhex(cid)
    return int.from_bytes(b[2:10], "big"), int.from_bytes(b[12:16], "big")


def chunk_spans(offset: int, length: int, chunk_size: int):
    """Yield (chunk_index, offset_in_chunk, n, offset_in_buffer) covering [offset, offset+length)."""
    pos, end = offset, offset + length
    while pos < end:
        idx, off = divmod(pos, chunk_size)
        n = min(chunk_size - off, end - pos)
        yield idx, off, n, pos - offset
        pos += n

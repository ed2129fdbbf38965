"""Small C kernels for CPU hot spots, built with the system C compiler on first use and called through ctypes.

Some CPU loops have no single torch op and cost several memory passes as eager ops (the FP8 weight decode of the
GEMM: five), or need data to stay in cache across what would be separate ops (MLA's decode tiles).
`seekstack.cpu_compile` fuses elementwise chains with TorchInductor, but a compiled function costs ~30-60 us a
call in guards and wrappers, more than the work on a cache-sized chunk; a ctypes call costs ~2 us. A
`NativeLibrary` compiles one C file (`-O3 -march=native`, ~0.2 s) into a shared library cached on disk under a
key of the source, the compiler, the flags and the CPU (so a home directory shared by different machines is safe),
and loads it once per process. Without a compiler, or with `SEEKSTACK_CPU_COMPILE=off`, `load()` returns None and
the caller runs its eager path; a failed build warns once. Callers check results bit for bit against their eager
path in the tests.

Cache: `$SEEKSTACK_CACHE_DIR/native`, else `$XDG_CACHE_HOME/seekstack/native`, else `~/.cache/seekstack/native`.

>>> lib = NativeLibrary("gemm_decode", Path(__file__).parent / "gemm" / "cpu_decode.c")
>>> # lib.load() -> a ctypes.CDLL, or None when the eager path must run
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from seekstack import cpu_compile

# -fno-trapping-math lets gcc turn value selections into vector blends (without it the decode loops stay scalar).
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]


def cache_dir() -> Path:
    if os.environ.get("SEEKSTACK_CACHE_DIR"):
        return Path(os.environ["SEEKSTACK_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seekstack" / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return platform.machine() + "\n" + "\n".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


class NativeLibrary:
    """One C source file built into a shared library on first `load()`; see the module docstring."""

    def __init__(
        self, name: str, source: Path, extra_flags: tuple[str, ...] = (), openmp: bool = False, headers: tuple = ()
    ):
        self.name, self.source, self.flags = name, Path(source), [*FLAGS, *extra_flags]
        self.headers = tuple(Path(h) for h in headers)  # files the source includes: part of the cache key
        # OpenMP: tried first, dropped when the compiler lacks it (the pragmas are then ignored: one thread).
        self.openmp = openmp
        self._lib: ctypes.CDLL | None = None
        self.failed: str | None = None  # why the build failed in this process; `load()` returns None from then on
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        if self._lib is not None:
            return self._lib if cpu_compile.mode() != "off" else None
        import torch  # noqa: F401  (loaded first: an OpenMP library then binds to torch's libgomp)

        if self.failed is not None or cpu_compile.mode() == "off":
            return None
        with self._lock:
            if self._lib is None and self.failed is None:
                try:
                    self._lib = ctypes.CDLL(str(self._build()))
                except Exception as exc:  # the eager path is always right
                    self.failed = f"{exc!r:.300}"
                    warnings.warn(f"seekstack: native CPU kernels {self.name} are off ({self.failed})", stacklevel=2)
        return self._lib

    def _build(self) -> Path:
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc)")
        if self.openmp:
            try:
                return self._build_with(cc, [*self.flags, "-fopenmp"])
            except RuntimeError:
                pass
        return self._build_with(cc, self.flags)

    def _build_with(self, cc: str, flags: list[str]) -> Path:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(
            "\0".join(
                [
                    self.source.read_text(),
                    *(h.read_text() for h in self.headers),
                    cc,
                    version,
                    " ".join(flags),
                    _cpu_identity(),
                ]
            ).encode()  # fmt: skip
        ).hexdigest()[:24]
        target = cache_dir() / f"{self.name}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes starting together (EP ranks) never load half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{self.name}-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *flags, "-o", tmp, str(self.source)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip()[-400:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

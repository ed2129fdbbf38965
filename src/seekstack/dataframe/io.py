"""Storage through fsspec: local paths and any registered protocol, e.g. ``3fs://`` (a `seekstack.fs` cluster).

Everything the dataframe layer does to files goes through these helpers: glob expansion, atomic commits
(write to a temporary name in the same directory, then rename), JSON manifests and parquet footers. Local paths
take a direct ``os`` fast path; other protocols use the fsspec filesystem, which DuckDB reads and writes through
``register_filesystem`` and pyarrow through ``PyFileSystem(FSSpecHandler(fs))``.

Which cluster a ``3fs://`` path names comes from `configure` (the session's ``storage_options``, which every worker
process applies before its task runs), else from seekstack.fs' own default (``$SEEKSTACK_FS_DATA``).

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_json_atomic(os.path.join(d, "m.json"), {"files": []})
>>> read_json(os.path.join(d, "m.json"))
{'files': []}
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import shutil
import uuid

import fsspec
import pyarrow.parquet as pq

# The `seekstack.fs` protocols: importing seekstack.fs.fsspec_fs registers them with fsspec.
FS_PROTOCOLS = ("3fs", "hf3fs")

_options: dict[str, dict] = {}
_cache: dict[tuple, object] = {}
_cache_pid = os.getpid()


def check_storage_options(storage_options) -> dict[str, dict]:
    """Validate ``{protocol: {fsspec option: value}}``; options must be plain JSON values, since they travel to
    worker processes (a live ``client=`` object cannot: give ``data=`` or ``mgmtd=`` + ``token=`` instead)."""
    if storage_options is None:
        return {}
    if not isinstance(storage_options, dict):
        raise ValueError(f"storage_options: expected a dict {{protocol: {{option: value}}}}, got {storage_options!r}")
    out = {}
    for proto, opts in storage_options.items():
        if not isinstance(proto, str) or "://" in proto or not isinstance(opts, dict):
            raise ValueError(
                f"storage_options: expected {{protocol: {{option: value}}}} such as "
                f"{{'3fs': {{'data': '/tmp/3fs'}}}}, got {proto!r}: {opts!r}"
            )
        try:
            json.dumps(opts)
        except TypeError as e:
            raise ValueError(f"storage_options[{proto!r}]: values must be plain JSON values ({e})") from e
        out[proto] = dict(opts)
    return out


def configure(storage_options: dict[str, dict] | None) -> None:
    """Set the fsspec options of the protocols named, e.g. ``{"3fs": {"data": "/tmp/3fs"}}``, in this process;
    protocols not named keep theirs (a session with local paths only leaves a 3fs session's settings alone).
    ``3fs`` and ``hf3fs`` share their options."""
    for proto, opts in check_storage_options(storage_options).items():
        for alias in FS_PROTOCOLS if proto in FS_PROTOCOLS else (proto,):
            _options[alias] = opts


def protocol_of(path: str) -> str:
    """``file`` for local paths, else the URL scheme (``3fs``, ``memory``, ...)."""
    if "://" not in path:
        return "file"
    proto = path.split("://", 1)[0]
    return "file" if proto in ("file", "local") else proto


def is_local(path: str) -> bool:
    return protocol_of(path) == "file"


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def filesystem(path: str):
    """The fsspec filesystem that serves `path`, with the configured options; one instance per process and
    options (fsspec's own cache keys on the thread too, which would open a cluster connection per thread)."""
    global _cache_pid
    proto = protocol_of(path)
    if proto in FS_PROTOCOLS:
        import seekstack.fs.fsspec_fs  # noqa: F401  (registers the protocols)
    opts = _options.get(proto, {})
    key = (FS_PROTOCOLS[0] if proto in FS_PROTOCOLS else proto, json.dumps(opts, sort_keys=True))
    if _cache_pid != os.getpid():
        _cache.clear()
        _cache_pid = os.getpid()
    fs = _cache.get(key)
    if fs is None:
        fs = _cache[key] = fsspec.filesystem(proto, **opts)
    return fs


def _client(fs):
    """The seekstack.fs client behind an fsspec filesystem, for calls fsspec has no name for (link, remove)."""
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return getattr(fs, "client", None) if set(protos) & set(FS_PROTOCOLS) else None


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return "/".join([base.rstrip("/"), *parts])


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(local_path(path), exist_ok=True)
    else:
        filesystem(path).makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(local_path(path))
    return filesystem(path).exists(path)


def remove_tree(path: str) -> None:
    if is_local(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    fs = filesystem(path)
    client = _client(fs)
    if client is not None and hasattr(client, "remove"):
        try:  # one recursive walk on the client instead of fsspec's find + stat + remove per file
            client.remove(fs._strip_protocol(path), recursive=True)
        except FileNotFoundError:
            pass
    elif fs.exists(path):
        fs.rm(path, recursive=True)


def rename(src: str, dst: str) -> None:
    """Atomic on POSIX file systems (and on 3FS, which keeps POSIX rename semantics)."""
    if is_local(src):
        os.replace(local_path(src), local_path(dst))
    else:
        filesystem(src).mv(src, dst)


def temp_name(final: str) -> str:
    """A hidden temporary name in the same directory as `final`, so that the commit rename stays atomic."""
    head, tail = os.path.split(local_path(final)) if is_local(final) else final.rsplit("/", 1)
    return join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


def expand_paths(paths: str | list[str], *, recursive: bool = False, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Expand globs and directories into a sorted file list; a pattern matching nothing raises FileNotFoundError."""
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise ValueError("paths: expected at least one path or glob, got an empty list")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"paths: expected strings, got {type(item).__name__}")
        found = _expand_one(item, recursive, suffixes)
        if not found:
            raise FileNotFoundError(f"no input files match {item!r}")
        out.extend(found)
    return out


def _expand_one(item: str, recursive: bool, suffixes: tuple[str, ...]) -> list[str]:
    def keep(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not base.startswith((".", "_")) and (not suffixes or base.endswith(suffixes))

    if is_local(item):
        p = local_path(item)
        if os.path.isdir(p):
            pattern = os.path.join(p, "**", "*") if recursive else os.path.join(p, "*")
            return sorted(f for f in _glob.glob(pattern, recursive=recursive) if os.path.isfile(f) and keep(f))
        if _glob.has_magic(p):
            return sorted(f for f in _glob.glob(p, recursive=recursive) if os.path.isfile(f))
        return [p] if os.path.isfile(p) else []
    fs = filesystem(item)
    proto = protocol_of(item)
    if fs.isdir(item):
        names = fs.find(item) if recursive else [f for f in fs.ls(item, detail=False) if fs.isfile(f)]
        names = [f for f in names if keep(f)]
    elif _glob.has_magic(item):
        names = fs.glob(item)
    else:
        names = [item] if fs.exists(item) else []
    return sorted(n if "://" in n else f"{proto}://{n}" for n in names)


def write_json_atomic(path: str, obj) -> None:
    tmp = temp_name(path)
    data = json.dumps(obj)
    if is_local(path):
        with open(local_path(tmp), "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with filesystem(path).open(tmp, "w") as f:
            f.write(data)
    rename(tmp, path)


def read_json(path: str):
    if is_local(path):
        with open(local_path(path)) as f:
            return json.load(f)
    with filesystem(path).open(path, "r") as f:
        return json.load(f)


@contextlib.contextmanager
def open_input(path: str):
    """Something pyarrow reads from: a local path as such (pyarrow's own file, no Python in the read path), else a
    binary fsspec file that is closed on exit. We open it ourselves because files that pyarrow opens through
    ``PyFileSystem`` are left to the garbage collector."""
    if is_local(path):
        yield local_path(path)
    else:
        with filesystem(path).open(path, "rb") as f:
            yield f


def parquet_metadata(path: str):
    with open_input(path) as f:
        return pq.read_metadata(f)


def parquet_schema(path: str):
    with open_input(path) as f:
        return pq.read_schema(f)


class _OwningWriter(pq.ParquetWriter):
    """A ParquetWriter on a file object it owns: `close` finishes the parquet footer and then closes the file."""

    def __init__(self, sink, schema, **options):
        self._owned_sink = sink
        try:
            super().__init__(sink, schema, **options)
        except BaseException:
            sink.close()
            raise

    def close(self):
        try:
            super().close()
        finally:
            self._owned_sink.close()


def parquet_writer(path: str, schema, **options) -> pq.ParquetWriter:
    if is_local(path):
        return pq.ParquetWriter(local_path(path), schema, **options)
    return _OwningWriter(filesystem(path).open(path, "wb"), schema, **options)


def read_parquet_table(paths: list[str], columns=None):
    """Read and concatenate parquet files in order (used by `to_arrow`)."""
    import pyarrow as pa

    tables = []
    for path in paths:
        with open_input(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


def copy_file(src: str, dst: str) -> None:
    """Copy (or hard-link when both are local and on one device) `src` to `dst`, atomically."""
    tmp = temp_name(dst)
    if is_local(src) and is_local(dst):
        try:
            os.link(local_path(src), local_path(tmp))
        except OSError:
            shutil.copyfile(local_path(src), local_path(tmp))
    elif not _link_same_cluster(src, tmp):
        with filesystem(src).open(src, "rb") as fi, filesystem(tmp).open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
    rename(tmp, dst)


def _link_same_cluster(src: str, dst: str) -> bool:
    """Hard-link `src` to `dst` when both are on the same seekstack.fs cluster (no data moves)."""
    if is_local(src) or is_local(dst):
        return False
    fs = filesystem(src)
    client = _client(fs)
    if client is None or filesystem(dst) is not fs or not hasattr(client, "link"):
        return False
    try:
        client.link(fs._strip_protocol(src), fs._strip_protocol(dst))
    except OSError:
        return False
    return True


def expand_paths_safe(pattern: str) -> list[str]:
    """Like `expand_paths` for one glob, but an empty match is fine."""
    return _expand_one(pattern, False, ())


def remove_file(path: str) -> None:
    if is_local(path):
        os.remove(local_path(path))
    else:
        filesystem(path).rm(path)

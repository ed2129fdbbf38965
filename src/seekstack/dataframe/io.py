"""Storage through fsspec: local paths and any registered protocol (e.g. ``3fs://`` once seekstack.fs is in).

Everything the dataframe layer does to files goes through these helpers: glob expansion, atomic commits
(write to a temporary name in the same directory, then rename), JSON manifests and parquet footers. Local paths
take a direct ``os`` fast path; other protocols use the fsspec filesystem, which DuckDB reads through
``register_filesystem`` and pyarrow through ``PyFileSystem(FSSpecHandler(fs))``.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_json_atomic(os.path.join(d, "m.json"), {"files": []})
>>> read_json(os.path.join(d, "m.json"))
{'files': []}
"""

from __future__ import annotations

import glob as _glob
import json
import os
import shutil
import uuid

import fsspec
import pyarrow.parquet as pq


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
    """The fsspec filesystem that serves `path`."""
    fs, _ = fsspec.core.url_to_fs(path)
    return fs


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
    elif exists(path):
        filesystem(path).rm(path, recursive=True)


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


def _pq_args(path: str) -> tuple[str, dict]:
    if is_local(path):
        return local_path(path), {}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path.split("://", 1)[1], {"filesystem": PyFileSystem(FSSpecHandler(filesystem(path)))}


def parquet_metadata(path: str):
    p, kw = _pq_args(path)
    return pq.read_metadata(p, **kw)


def parquet_schema(path: str):
    p, kw = _pq_args(path)
    return pq.read_schema(p, **kw)


def parquet_writer(path: str, schema, **options) -> pq.ParquetWriter:
    p, kw = _pq_args(path)
    return pq.ParquetWriter(p, schema, **kw, **options)


def read_parquet_table(paths: list[str], columns=None):
    """Read and concatenate parquet files in order (used by `to_arrow`)."""
    import pyarrow as pa

    tables = []
    for path in paths:
        p, kw = _pq_args(path)
        tables.append(pq.read_table(p, columns=columns, **kw))
    return pa.concat_tables(tables) if tables else None


def copy_file(src: str, dst: str) -> None:
    """Copy (or hard-link when both are local and on one device) `src` to `dst`, atomically."""
    tmp = temp_name(dst)
    if is_local(src) and is_local(dst):
        try:
            os.link(local_path(src), local_path(tmp))
        except OSError:
            shutil.copyfile(local_path(src), local_path(tmp))
    else:
        with fsspec.open(src, "rb") as fi, fsspec.open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
    rename(tmp, dst)


def expand_paths_safe(pattern: str) -> list[str]:
    """Like `expand_paths` for one glob, but an empty match is fine."""
    return _expand_one(pattern, False, ())


def remove_file(path: str) -> None:
    if is_local(path):
        os.remove(local_path(path))
    else:
        filesystem(path).rm(path)

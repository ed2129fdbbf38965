"""Fixtures: a PostgreSQL server started locally for the KV tests (skipped without the binaries), and a client of
the module's own `cluster` fixture."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL on 127.0.0.1 (initdb + pg_ctl, run as user postgres when we are root)."""
    pytest.importorskip("psycopg")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (looked in /usr/lib/postgresql/*/bin and PATH)")
    prefix: list[str] = []
    if os.getuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="seekstack-pg-")
    data = os.path.join(root, "data")
    if prefix:
        shutil.chown(root, "postgres")
    port = _free_port()
    env = dict(os.environ, LC_ALL="C")
    try:
        subprocess.run(
            [*prefix, f"{bindir}/initdb", "-A", "trust", "-U", "postgres", "-D", data],
            check=True,
            capture_output=True,
            env=env,
            cwd=root,
        )
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
        subprocess.run(
            [*prefix, f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", f"{root}/log", "-w", "start"],
            check=True,
            capture_output=True,
            env=env,
            cwd=root,
        )
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(e, 'stderr', e)!r}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            env=env,
            cwd=root,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fs(cluster):
    """A client of the `cluster` fixture that the test module defines (its own shape of local cluster)."""
    client = cluster.connect()
    yield client
    client.close()

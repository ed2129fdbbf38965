"""Fixtures: one real local cluster (mgmtd + meta + 3 storage processes on 127.0.0.1) shared by this package's
tests, its client, and a `LocalDirClient` over a temp directory as a second backend for the same checks."""

from __future__ import annotations

import os

import pytest

from seekstack.fs.testing import local_cluster
from seekstack.fs.usrbio import LocalDirClient

CHUNK = 64 << 10  # small chunks so even small files span several chains


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with local_cluster(
        tmp_path_factory.mktemp("fsaccess") / "cluster", storage_nodes=3, replicas=2, chunk_size=CHUNK
    ) as c:
        yield c


@pytest.fixture(scope="session")
def fs(cluster):
    client = cluster.connect()
    yield client
    client.close()


@pytest.fixture
def local(tmp_path):
    d = tmp_path / "localfs"
    d.mkdir()
    return LocalDirClient(d)


@pytest.fixture(params=["cluster", "local"])
def client(request):
    """Each test using this runs once on the cluster client and once on a LocalDirClient."""
    return request.getfixturevalue("fs" if request.param == "cluster" else "local")


@pytest.fixture
def rng(seed):
    import numpy as np

    return np.random.default_rng(seed)


@pytest.fixture
def uniq(request):
    """A cluster path unique to this test (the cluster is shared by the session)."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    return f"/t_{name}_{os.getpid()}"

"""The Ray executor: each task is a Ray remote call (one CPU); only file lists travel, the data stays in the
shared `data_root`. Ray's own retries are off: the driver retries, so the attempt count and checkpoints stay ours.
"""

from __future__ import annotations

import os
import tempfile

from seekstack.dataframe.execution.runner import RunSettings, execute


def start_ray(address: str, num_cpus: int | None, temp_dir: str | None = None) -> bool:
    """Connect to `address`, or start a local Ray on 127.0.0.1 when it is ``"local"``; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only cluster; no token file in $HOME
        # Ray turns "127.0.0.1" into the host's routable address unless "cluster mode" is off; this setting is
        # read at import time, so it is set for child processes and patched in the already imported module.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        # Unix socket paths must stay short (108 bytes), so Ray's session directory goes under /tmp.
        temp_dir = temp_dir or tempfile.mkdtemp(prefix="sray-", dir="/tmp")
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


class RayExecutor:
    """Submits a batch of tasks as Ray remote calls and waits for all of them."""

    def __init__(self, settings: RunSettings):
        import ray

        self.settings = settings
        self._remote = ray.remote(num_cpus=1, max_retries=0)(execute)

    def run_many(self, items: list[tuple[bytes, int]]) -> list[tuple]:
        import ray

        refs = [self._remote.remote(blob, attempt, self.settings) for blob, attempt in items]
        outcomes = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayError as exc:  # worker crashed, node lost, ...
                outcomes.append(("err", type(exc).__name__, str(exc), True, ""))
        return outcomes

    def shutdown(self) -> None:
        pass

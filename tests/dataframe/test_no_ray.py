"""The embedded executor needs neither Ray nor Ray's cloudpickle: user functions travel with the standalone
cloudpickle package, and a job runs with ``import ray`` made to fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_local_executor_runs_without_ray(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ray"] = None  # any "import ray" now raises ImportError
        import seekstack.dataframe as sp
        from seekstack.dataframe import serialize
        assert serialize._cp.__name__ == "cloudpickle", serialize._cp
        offset = 7
        with sp.init(data_root={str(tmp_path)!r}, num_executors=1) as s:
            df = s.from_items([{{"x": i}} for i in range(10)]).repartition(2, by_rows=True)
            got = sorted(r["y"] for r in df.map(lambda r: {{"y": r["x"] * 2 + offset}}).take_all())
        assert got == [2 * i + 7 for i in range(10)], got
        assert "ray" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

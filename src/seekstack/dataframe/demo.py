"""`seekstack demo` stage: prepare a small token dataset for training with the dataframe layer.

Synthetic documents (token-id lists with a quality score) are spread over partitions by document id, filtered and
deduplicated per partition with DuckDB, and written as parquet (``tokens/part-*.parquet``: doc_id, tokens,
num_tokens) for the trainer to read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

VOCAB = 32_000


def make_documents(num_docs: int, seed: int = 0) -> pa.Table:
    """Documents with Zipf-like token ids; every 10th is a duplicate of an earlier one (for the dedup step)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 256, num_docs)
    docs = [np.minimum(rng.zipf(1.2, n), VOCAB - 1).astype(np.int32) for n in lengths]
    for i in range(10, num_docs, 10):
        docs[i] = docs[i - 7]
    return pa.table(
        {
            "doc_id": np.arange(num_docs, dtype=np.int64),
            "tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.int32())),
            "quality": rng.random(num_docs),
        }
    )


def run_demo(workdir: Path) -> dict[str, str]:
    import seekstack.dataframe as sp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    docs = make_documents(4000)
    with sp.init(data_root=str(workdir / "data_root"), num_executors=2, job_id="demo") as s:
        df = s.from_arrow(docs).repartition(4, hash_by="tokens")  # duplicates land in one partition
        prepared = s.partial_sql(
            "SELECT min(doc_id) AS doc_id, tokens, len(tokens) AS num_tokens FROM {0} "
            "WHERE quality >= 0.2 GROUP BY tokens",
            df,
        ).partial_sort("doc_id")
        files = prepared.write_parquet(str(workdir / "tokens"))
        kept = prepared.count()
        total_tokens = int(pa.compute.sum(prepared.to_arrow()["num_tokens"]).as_py())
    return {
        "documents": f"{docs.num_rows} in, {kept} kept after quality filter + exact dedup",
        "tokens": f"{total_tokens} tokens in {len(files)} parquet files under {workdir / 'tokens'}",
    }

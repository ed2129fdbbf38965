"""`seekstack eplb LOADFILE` on each file format, the demo stage and the benchmark, run in-process."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from seekstack.cli.main import main
from seekstack.eplb import rebalance_experts

WEIGHT = np.array(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)


def _write(path, fmt):
    if fmt == "npy":
        np.save(path, WEIGHT)
    elif fmt == "csv":
        np.savetxt(path, WEIGHT, delimiter=",", fmt="%d")
    else:
        torch.save(torch.from_numpy(WEIGHT), path)


@pytest.mark.parametrize("fmt", ["npy", "csv", "pt"])
def test_eplb_command(tmp_path, capsys, fmt):
    load = tmp_path / f"load.{fmt}"
    _write(load, fmt)
    png, out_json = tmp_path / "heat.png", tmp_path / "placement.json"
    argv = ["eplb", str(load), "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]
    assert main(argv + ["--heatmap", str(png), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "hierarchical policy" in text and "balancedness" in text
    assert "0.828" in text.replace("0.8277", "0.828")  # layer 0 after rebalancing
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    saved = json.loads(out_json.read_text())
    assert saved["phy2log"] == rebalance_experts(torch.from_numpy(WEIGHT), 16, 4, 2, 8)[0].tolist()
    assert saved["balancedness_after"][0] == pytest.approx(0.8277, abs=1e-4)
    assert saved["balancedness_after"][0] > saved["balancedness_before"][0]


def test_eplb_command_bad_input(tmp_path, capsys):
    bad = tmp_path / "load.txt"
    bad.write_text("1 2 3")
    assert main(["eplb", str(bad)]) == 2
    assert "unsupported load file type" in capsys.readouterr().err
    assert main(["eplb", str(tmp_path / "missing.npy")]) == 2
    assert "not found" in capsys.readouterr().err
    np.save(tmp_path / "neg.npy", -np.ones((2, 8)))
    assert main(["eplb", str(tmp_path / "neg.npy")]) == 2
    assert "non-negative" in capsys.readouterr().err


def test_demo_stage(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--only", "eplb"]) == 0
    out = capsys.readouterr().out
    assert "eplb" in out and "ok" in out and "before" in out
    assert (tmp_path / "eplb" / "eplb_heatmap.png").stat().st_size > 1000


def test_bench_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("seekstack.bench.harness.RESULTS_DIR", tmp_path)
    assert main(["bench", "eplb", "--layers", "4", "--repeats", "1", "--trials", "2"]) == 0
    data = json.loads((tmp_path / "eplb.json").read_text())
    rows = {r[0]: r for r in data["rows"]}
    assert rows["per-layer loop (baseline)"][2] == 1.0
    assert rows["vectorised"][4] == rows["per-layer loop (baseline)"][4]  # same placement, same balancedness
    assert data["hardware"]["cores"] >= 1 and "distinct-per-GPU" in data["notes"][0]

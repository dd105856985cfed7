"""Smoke test of bench/attn.py: a tiny CPU sweep produces a table, JSON rows and a PNG, with every
number positive and finite. No timing assertions."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ultimus_kernels import available_backends

ROOT = Path(__file__).resolve().parent.parent


def bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "attn.py"), "--quick", "--device", "cpu",
                           "--no-progress", "--min-run-time", "0.02", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_cpu_sweep_writes_table_json_and_plot(tmp_path):
    providers = ["reference"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    png = tmp_path / "bench.png"
    stdout, doc = bench(tmp_path, "--backends", ",".join(providers), "--batch-sizes", "64,257",
                        "--plot", str(png))
    rows = doc["rows"]
    assert len(rows) == len(providers) * 2 * 3  # providers x batch sizes x modes
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        for key in ("median_ms", "p20_ms", "p80_ms", "gb_per_s", "speedup_vs_eager"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["device"] and r["torch"] and r["date"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "median ms" in stdout and "vs eager" in stdout


def test_model_mode_times_a_training_step(tmp_path):
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    _, doc = bench(tmp_path, "--model", "--backends", "reference,cpu", "--model-batch-sizes", "16")
    assert [r["provider"] for r in doc["rows"]] == ["reference", "cpu"]
    assert all(r["mode"] == "train-step" and r["median_ms"] > 0 for r in doc["rows"])


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "attn.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--device", "--backends", "--modes", "--batch-sizes", "--dtype", "--threads", "--quick",
                 "--json", "--plot", "--model", "--max-autotune"):
        assert flag in out

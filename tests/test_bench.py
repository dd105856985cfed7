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


def run_bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """bench/attn.py with these arguments, in a child process, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attn.py"), *args], capture_output=True, text=True, timeout=timeout
    )


def bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = run_bench(
        "--quick", "--device", "cpu", "--no-progress", "--min-run-time", "0.02", "--json", str(out), *extra, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_cpu_sweep_writes_table_json_and_plot(tmp_path):
    providers = ["reference"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    png = tmp_path / "bench.png"
    stdout, doc = bench(tmp_path, "--backends", ",".join(providers), "--batch-sizes", "64,257", "--plot", str(png))
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


def test_stack_mode_times_the_fused_stack_against_single_calls(tmp_path):
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    _, doc = bench(tmp_path, "--stack", "3", "--backends", "reference,cpu,cpu-blocks", "--batch-sizes", "33")
    rows = doc["rows"]
    assert {r["provider"] for r in rows} == {"reference", "cpu", "cpu-blocks"} and len(rows) == 9
    assert all(r["blocks"] == 3 and r["median_ms"] > 0 and math.isfinite(r["gb_per_s"]) for r in rows)
    assert run_bench("--stack", "2", "--backends", "cpu-fast").returncode == 2
    assert "--stack times the batch-size sweep" in run_bench("--stack", "2", "--model").stderr


def test_help_lists_the_flags():
    out = run_bench("--help").stdout
    for flag in (
        "--device",
        "--backends",
        "--modes",
        "--batch-sizes",
        "--dtype",
        "--threads",
        "--quick",
        "--json",
        "--plot",
        "--model",
        "--max-autotune",
    ):
        assert flag in out


def test_overhead_mode_times_every_path_per_call(tmp_path):
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    stdout, doc = bench(
        tmp_path, "--overhead", "--backends", "reference,cpu", "--overhead-batch-sizes", "1", "--threads", "1"
    )
    providers = {r["provider"] for r in doc["rows"]}
    assert providers == {
        "reference",
        "cpu raw ops",
        "cpu op + its autograd",
        "cpu UltimusFunction",
        "cpu TransformFunction",
        "cpu UltimusBlock",
    }
    assert {r["mode"] for r in doc["rows"]} == {"fwd", "fwd+bwd"}
    for r in doc["rows"]:
        assert math.isfinite(r["median_us"]) and r["median_us"] > 0 and r["B"] == 1
    assert "median us" in stdout and "vs raw ops" in stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dim", "0"], "--dim: must be at least 1"),
        (["--attn-dim", "-3"], "--attn-dim: must be at least 1"),
        (["--batch-sizes", "128,0"], "--batch-sizes: must be at least 1"),
        (["--batch-sizes", "12x"], "--batch-sizes: expected an integer"),
        (["--threads", "0"], "--threads: must be at least 1"),
        (["--min-run-time", "0"], "--min-run-time: must be a positive number"),
        (["--backends", "reference,fast"], "unknown provider 'fast'"),
        (["--model", "--plot", "x.png"], "--plot draws the batch-size sweep"),
    ],
)
def test_bad_arguments_are_argparse_errors(extra, message):
    proc = run_bench("--device", "cpu", *extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_unwritable_output_fails_before_timing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for flag in ("--json", "--plot"):
        proc = run_bench("--device", "cpu", "--quick", flag, str(blocker / "out.x"))
        assert proc.returncode == 2 and f"{flag} {blocker / 'out.x'}: cannot write there" in proc.stderr
        assert "median" not in proc.stdout  # nothing was timed


def test_nothing_to_time_exits_non_zero(tmp_path):
    proc = run_bench("--device", "cpu", "--backends", "cuda", "--quick", "--no-progress")
    assert proc.returncode != 0 and "nothing was timed" in proc.stderr and "cuda" in proc.stderr

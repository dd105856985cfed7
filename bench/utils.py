"""Timing and reporting for the benchmarks (Liger-Kernel's benchmark/scripts/utils.py is the model):
timers for the GPU (CUDA events), the CPU (torch.utils.benchmark) and the host path (wall clock);
the device's copy bandwidth; the device's name; tables, speed-up columns and plots of result rows."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def time_gpu(run: Callable) -> tuple[float, float, float]:
    """(median, p20, p80) in ms, with CUDA events through triton.testing.do_bench."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(run, warmup=50, rep=200, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def time_cpu(run: Callable, threads: int, min_run_time: float) -> tuple[float, float, float]:
    """(median, p20, p80) in ms, with torch.utils.benchmark (blocked autorange)."""
    from torch.utils import benchmark

    run()  # warm-up
    m = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time
    )
    times = sorted(m.times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3  # noqa: E731
    return m.median * 1e3, q(0.2), q(0.8)


def copy_bandwidth_gbs(device) -> Optional[float]:
    """The device's measured copy bandwidth: a 1 GiB device-to-device copy, read + write bytes."""
    if device.type != "cuda":
        return None
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    src = dst = None  # 2 GiB back to the allocator before the sweep
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def time_wall_us(runs: dict[str, Callable], device, min_run_time: float) -> dict[str, tuple[float, float, float]]:
    """{label: (median, p20, p80)} wall-clock microseconds per call: what a caller waits for, host path
    included (on a GPU the calls are queued back to back and the device synchronised once per sample).

    The runs are timed interleaved, one sample of each per round for about `min_run_time` seconds per
    run, so that a slow spell of a shared machine lands on all of them alike and their ratios hold."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(run: Callable, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        sync()
        return time.perf_counter() - t0

    calls = {}
    for label, run in runs.items():
        for _ in range(3):
            run()
        n = 1
        while sample(run, n) < min_run_time / 20:  # calls per sample: ~20 samples in min_run_time
            n *= 2
        calls[label] = n
    samples: dict[str, list[float]] = {label: [] for label in runs}
    deadline, rounds = time.perf_counter() + min_run_time * len(runs), 0
    while rounds < 7 or (time.perf_counter() < deadline and rounds < 200):
        for label, run in runs.items():
            samples[label].append(sample(run, calls[label]) / calls[label] * 1e6)
        rounds += 1
    result = {}
    for label, values in samples.items():
        values.sort()
        q = lambda f: values[min(len(values) - 1, int(f * len(values)))]  # noqa: E731
        result[label] = (q(0.5), q(0.2), q(0.8))
    return result


def add_speedups(rows: list[dict], group: tuple, time_key: str = "median_ms") -> None:
    """speedup_vs_eager and speedup_vs_compile of every row, against the rows of providers "reference"
    and "compile" that share the `group` keys (e.g. mode, B, dtype) and so ran the same work."""
    base = {(*(r[k] for k in group), r["provider"]): r[time_key] for r in rows}
    for r in rows:
        key = tuple(r[k] for k in group)
        r["speedup_vs_eager"] = base.get((*key, "reference"), float("nan")) / r[time_key]
        r["speedup_vs_compile"] = base.get((*key, "compile"), float("nan")) / r[time_key]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _fmt(v, spec: str) -> str:
    """A table cell: "-" for a missing or NaN value."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (
        f"{'provider':<21}{'mode':<11}{'dtype':<9}{'B':>9}{'median ms':>11}{'p20-p80 ms':>19}"
        f"{'vs eager':>9}{'vs compile':>11}{'GB/s':>8}{'% copy':>8}{'peak MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['provider']:<21}{r['mode']:<11}{r['dtype']:<9}{r['B']:>9}{r['median_ms']:>11.4f}"
            f"{_fmt(r['p20_ms'], '.4f') + '-' + _fmt(r['p80_ms'], '.4f'):>19}"
            f"{_fmt(r.get('speedup_vs_eager'), '.2f') + 'x':>9}{_fmt(r.get('speedup_vs_compile'), '.2f') + 'x':>11}"
            f"{_fmt(r.get('gb_per_s'), '.1f'):>8}{_fmt(r.get('pct_copy_bandwidth'), '.1f'):>8}"
            f"{_fmt(r.get('peak_mem_mib'), '.1f'):>9}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5 * len(modes), 4 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for prov in dict.fromkeys(r["provider"] for r in rows):
                pts = sorted(
                    (r["B"], r["B"] / (r["median_ms"] * 1e-3))
                    for r in rows
                    if r["provider"] == prov and r["mode"] == mode and r["dtype"] == dtype
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="samples / s", title=f"{mode}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overhead_table(rows: list[dict]) -> str:
    head = f"{'provider':<30}{'mode':<9}{'B':>6}{'median us':>11}{'p20-p80 us':>17}{'vs eager':>10}{'vs raw ops':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['provider']:<30}{r['mode']:<9}{r['B']:>6}{r['median_us']:>11.1f}"
            f"{_fmt(r['p20_us'], '.1f') + '-' + _fmt(r['p80_us'], '.1f'):>17}"
            f"{_fmt(r['speedup_vs_eager'], '.2f') + 'x':>10}{_fmt(r['vs_raw_ops'], '.2f') + 'x':>12}"
        )
    return "\n".join(lines)

"""Microbenchmarks of the Ultimus block: every backend against PyTorch eager and torch.compile.

    python bench/attn.py                      # full sweep on the default device
    python bench/attn.py --quick              # a run under a minute on CPU
    python bench/attn.py --device cuda --json bench/results/h100.json --plot bench/results/h100.png
    python bench/attn.py --model              # a full UltimusNet training step per backend
    python bench/attn.py --overhead --threads 1   # the host path: us per call at B = 1 and 128
    python bench/attn.py --stack 4            # a stack of 4 blocks: fused stack vs 4 single fused calls

Providers: `reference` (eager PyTorch, the baseline), `compile` (torch.compile of the reference),
`compile-max-autotune` (GPU, with --max-autotune), and every fused backend that runs on the device
(`triton`, `cpu`, `cuda`). With `--stack L`, every provider runs L blocks in a row: a fused backend
as one fused stack (`ultimus_stack`), and as `<backend>-blocks`, L single fused calls. Modes: `fwd`
(training forward: inputs require grad), `bwd` (backward only, from a saved graph), `fwd+bwd`.

Bytes counted (the roofline reported against): the fused block must read x and write y once in the
forward (2*B*D elements), read x and gy and write gx in the backward (3*B*D elements), plus the
weights (4*d*D + 3*d + D elements, read once). A stack of L blocks moves what one block does (the
activations between blocks stay on chip), plus L blocks' weights. GB/s = those bytes / median time. On a GPU the script
measures the device's copy bandwidth itself (a 1 GiB device-to-device copy, read + write bytes) and
reports each run as a percentage of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
from utils import (  # noqa: E402  (bench/utils.py)
    MODES,
    add_speedups,
    copy_bandwidth_gbs,
    device_name,
    overhead_table,
    plot,
    table,
    time_cpu,
    time_gpu,
    time_wall_us,
)

from ultimus_kernels import (  # noqa: E402
    FUSED_BACKENDS,
    MAX_ATTN_DIM,
    MAX_DIM,
    UltimusParams,
    ultimus,
    ultimus_reference,
    ultimus_stack,
    ultimus_stack_reference,
)
from ultimus_kernels.dispatch import unavailable_reason  # noqa: E402

FUSED = FUSED_BACKENDS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_BYTES = 64 << 20  # rotate inputs so that the sets together exceed this (L2 of an H100: 50 MB)


# ------------------------------------------------------------------------------------------------
# Inputs and providers
# ------------------------------------------------------------------------------------------------


def make_set(B, D, d, dtype, device, gen, stack: Optional[int] = None):
    """One random input set (never zeros): x, parameters in nn.Linear layouts (one block's, or a list of
    `stack` blocks'), and gy."""

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype).requires_grad_()

    def block():
        scales = (D**-0.5, 0.1, D**-0.5, 0.1, D**-0.5, 0.1)
        shapes = ((d, D), (d,), (d, D), (d,), (d, D), (d,))
        return UltimusParams(*(r(*shape, s=s) for shape, s in zip(shapes, scales)), r(D, d, s=d**-0.5), r(D, s=0.1))

    params = block() if stack is None else [block() for _ in range(stack)]
    return r(B, D), params, r(B, D).detach()


def flat_params(params) -> list:
    """The tensors of one block's parameters or of a stack's."""
    return list(params) if isinstance(params, UltimusParams) else [t for block in params for t in block]


def block_bytes(mode: str, B: int, D: int, d: int, elem: int, blocks: int = 1) -> int:
    """The fewest bytes a fused block (or a fused stack of `blocks`) moves: activations once each,
    weights once."""
    per_row = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * D
    weights = (4 * d * D + 3 * d + D) * blocks
    return (B * per_row + weights * (2 if mode == "fwd+bwd" else 1)) * elem


def provider_fn(name: str, max_autotune: bool = False, stack: Optional[int] = None) -> Callable:
    if stack is not None:
        return _stack_provider_fn(name, max_autotune)
    if name == "reference":
        return lambda x, p: ultimus_reference(x, *p)
    if name.startswith("compile"):
        compiled = torch.compile(
            ultimus_reference, dynamic=False, mode="max-autotune-no-cudagraphs" if max_autotune else None
        )
        return lambda x, p: compiled(x, *p)
    return lambda x, p, name=name: ultimus(x, *p, backend=name)


def _stack_provider_fn(name: str, max_autotune: bool) -> Callable:
    """Providers of a stack (p is a list of blocks): eager and compiled loops, the fused stack, and
    `<backend>-blocks`, one fused call per block."""
    if name == "reference":
        return ultimus_stack_reference
    if name.startswith("compile"):
        mode = "max-autotune-no-cudagraphs" if max_autotune else None
        return torch.compile(ultimus_stack_reference, dynamic=False, mode=mode)
    if name.endswith("-blocks"):
        backend = name[: -len("-blocks")]

        def blocks(x, p):
            for block in p:
                x = ultimus(x, *block, backend=backend)
            return x

        return blocks
    return lambda x, p, name=name: ultimus_stack(x, p, backend=name)


def mode_fn(mode: str, fn: Callable, sets) -> Callable:
    """A closure running `mode` once, on the next input set in rotation."""
    state = {"i": 0}
    saved = {}
    if mode == "bwd":  # graphs built once outside the timed region; retain_graph keeps them
        for i, (x, p, gy) in enumerate(sets):
            saved[i] = fn(x, p)

    def run():
        i = state["i"] = (state["i"] + 1) % len(sets)
        x, p, gy = sets[i]
        if mode == "fwd":
            return fn(x, p)
        y = saved[i] if mode == "bwd" else fn(x, p)
        return torch.autograd.grad(y, [x, *flat_params(p)], gy, retain_graph=(mode == "bwd"))

    return run


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------


def providers_for(args, device) -> tuple[list[str], dict[str, str]]:
    wanted = (
        args.backends.split(",")
        if args.backends
        else (["reference", "compile"] + (["compile-max-autotune"] if args.max_autotune else []) + list(FUSED))
    )
    chosen, skipped = [], {}
    for name in wanted:
        base = name[: -len("-blocks")] if name.endswith("-blocks") else name
        if base in FUSED:
            why = unavailable_reason(base, device)
            if why is None and (args.dim > MAX_DIM or args.attn_dim > MAX_ATTN_DIM):
                why = f"the fused kernels need D <= {MAX_DIM} and d <= {MAX_ATTN_DIM}"
            if base == "triton" and device.type == "cpu" and why is None:
                why = "the Triton interpreter is a correctness tool, not a timing target"
            if why:
                skipped[name] = why
                continue
        if name == "compile-max-autotune" and device.type != "cuda":
            skipped[name] = "max-autotune is for GPUs"
            continue
        chosen.append(name)
        if name in FUSED and args.stack is not None and not args.backends:
            chosen.append(f"{name}-blocks")
    return chosen, skipped


def announced_providers(args, device) -> tuple[list[str], dict[str, str]]:
    """providers_for, saying on stderr why each skipped provider is skipped."""
    providers, skipped = providers_for(args, device)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    return providers, skipped


def time_run(run: Callable, device, args) -> tuple[float, float, float]:
    """(median, p20, p80) ms of `run`: CUDA events on a GPU, torch.utils.benchmark on the CPU."""
    return time_gpu(run) if device.type == "cuda" else time_cpu(run, args.threads, args.min_run_time)


def sweep(args, device) -> tuple[list[dict], dict[str, str], Optional[float]]:
    """Every provider, mode, batch size and dtype: (rows, skipped providers and why, copy bandwidth GB/s)."""
    from tqdm import tqdm

    providers, skipped = announced_providers(args, device)
    bandwidth = copy_bandwidth_gbs(device)
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth:.0f} GB/s", file=sys.stderr)
    dtypes = [DTYPES[t] for t in args.dtype.split(",")]
    jobs = [
        (dtype, B, mode, prov)
        for dtype in dtypes
        for B in args.batch_sizes
        for mode in args.modes
        for prov in providers
    ]
    gen = torch.Generator().manual_seed(0)
    rows, fns, inputs = [], {}, {}
    bar = tqdm(jobs, desc="benchmark", file=sys.stderr, disable=args.no_progress)
    for dtype, B, mode, prov in bar:
        bar.set_postfix_str(f"{prov} {mode} B={B} {str(dtype)[6:]}")
        key = (dtype, B)
        if key not in inputs:
            inputs.clear()  # one size in memory at a time
            # A fresh torch.compile per size: with dynamic=False every size is a recompile, and past
            # Dynamo's recompile limit (8) a compiled function silently runs eager.
            fns = {p: f for p, f in fns.items() if not p.startswith("compile")}
            torch._dynamo.reset()
            elem = torch.finfo(dtype).bits // 8
            n_sets = max(1, min(16, math.ceil(CACHE_BYTES / max(1, 5 * B * args.dim * elem))))
            inputs[key] = [make_set(B, args.dim, args.attn_dim, dtype, device, gen, args.stack) for _ in range(n_sets)]
        if prov not in fns:
            fns[prov] = provider_fn(prov, max_autotune=prov.endswith("max-autotune"), stack=args.stack)
        run = mode_fn(mode, fns[prov], inputs[key])
        if device.type == "cuda":
            torch.cuda.synchronize()
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            med, p20, p80 = time_run(run, device, args)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            med, p20, p80 = time_run(run, device, args)
            peak = None
        nbytes = block_bytes(mode, B, args.dim, args.attn_dim, torch.finfo(dtype).bits // 8, args.stack or 1)
        gbs = nbytes / (med * 1e-3) / 1e9
        rows.append(
            dict(
                provider=prov,
                mode=mode,
                B=B,
                D=args.dim,
                d=args.attn_dim,
                blocks=args.stack or 1,
                dtype=str(dtype)[6:],
                median_ms=med,
                p20_ms=p20,
                p80_ms=p80,
                bytes=nbytes,
                gb_per_s=gbs,
                pct_copy_bandwidth=(100 * gbs / bandwidth) if bandwidth else None,
                peak_mem_mib=peak,
            )
        )
    add_speedups(rows, ("mode", "B", "dtype"))
    return rows, skipped, bandwidth


# ------------------------------------------------------------------------------------------------
# The end-to-end effect: one UltimusNet training step per backend
# ------------------------------------------------------------------------------------------------


def model_sweep(args, device) -> list[dict]:
    from model import UltimusNet

    providers, _ = announced_providers(args, device)
    rows = []
    for B in args.model_batch_sizes:
        images = torch.randn(B, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (B,), device=device)
        # On a GPU each fused backend's step is also timed replayed as a CUDA graph ("<backend>+graph").
        graphed = [(prov, False) for prov in providers] + [
            (prov, True) for prov in providers if device.type == "cuda" and prov in FUSED
        ]
        for prov, as_graph in graphed:
            torch._dynamo.reset()  # a fresh compile per (B, provider); see sweep()
            torch.manual_seed(0)
            net = UltimusNet(backend="reference" if prov.startswith("compile") else prov).to(device)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=as_graph)
            step_net = torch.compile(net) if prov.startswith("compile") else net

            def step():
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(step_net(images), labels).backward()
                opt.step()

            step()
            run = graph_of(step) if as_graph else step
            med, p20, p80 = time_run(run, device, args)
            rows.append(
                dict(
                    provider=prov + ("+graph" if as_graph else ""),
                    mode="train-step",
                    B=B,
                    dtype="float32",
                    median_ms=med,
                    p20_ms=p20,
                    p80_ms=p80,
                )
            )
    add_speedups(rows, ("B",))
    return rows


def graph_of(step: Callable) -> Callable:
    """`step` captured as a CUDA graph (PyTorch's whole-network recipe: warm-up on a side stream, then
    capture); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# ------------------------------------------------------------------------------------------------
# Host overhead: microseconds per call at small B, where the kernels do little work
# ------------------------------------------------------------------------------------------------


def overhead_sweep(args, device) -> list[dict]:
    """Per call, fwd and fwd+bwd: each fused backend's raw ops (no autograd), its ops under each autograd
    boundary, the public path (UltimusBlock), eager PyTorch and torch.compile of the reference."""
    from ultimus_kernels import UltimusBlock, UltimusFunction
    from ultimus_kernels.ops.autograd import FUSED_OPS, UltimusTransformFunction

    providers, _ = announced_providers(args, device)
    rows = []
    for B in args.overhead_batch_sizes:
        torch.manual_seed(0)
        x = torch.randn(B, args.dim, device=device, requires_grad=True)
        gy = torch.randn(B, args.dim, device=device)
        block = UltimusBlock(args.dim, args.attn_dim, backend="reference").to(device)
        params = UltimusParams.of(block)
        plain = [x.detach(), *(p.detach() for p in params)]
        timed: dict[str, Callable] = {}
        for prov in providers:
            if prov in FUSED:
                fwd, bwd = FUSED_OPS[prov].fwd, FUSED_OPS[prov].bwd
                timed[f"{prov} raw ops"] = (
                    lambda f=fwd: f(*plain, True),
                    lambda f=fwd, b=bwd: (f(*plain, True), b(gy, *plain, True, True, True)),
                )
                # The autograd boundaries, each over the same kernels: the op's own registered autograd
                # (C++ for cpu/cuda, torch.library.register_autograd for triton), UltimusFunction, and the
                # setup_context form torch.func needs (UltimusTransformFunction).
                for label, call in (
                    (f"{prov} op + its autograd", lambda f=fwd: f(x, *params, True)),
                    (f"{prov} UltimusFunction", lambda n=prov: UltimusFunction.apply(n, True, x, *params)),
                    (f"{prov} TransformFunction", lambda n=prov: UltimusTransformFunction.apply(n, True, x, *params)),
                ):
                    timed[label] = (call, lambda call=call: torch.autograd.grad(call(), [x, *params], gy))
            fn, own = block_provider(prov, args)
            timed[prov if prov.startswith(("reference", "compile")) else f"{prov} UltimusBlock"] = (
                lambda fn=fn: fn(x),
                lambda fn=fn, own=own: torch.autograd.grad(fn(x), [x, *own], gy),
            )
        for mode, index in (("fwd", 0), ("fwd+bwd", 1)):
            timings = time_wall_us({label: runs[index] for label, runs in timed.items()}, device, args.min_run_time)
            for label, (med, p20, p80) in timings.items():
                rows.append(
                    dict(
                        provider=label,
                        mode=mode,
                        B=B,
                        D=args.dim,
                        d=args.attn_dim,
                        dtype="float32",
                        median_us=med,
                        p20_us=p20,
                        p80_us=p80,
                    )
                )
    add_speedups(rows, ("mode", "B"), time_key="median_us")
    base = {(r["mode"], r["B"], r["provider"]): r["median_us"] for r in rows}
    for r in rows:
        key = (r["mode"], r["B"])
        raw = r["provider"].split(" ")[0] + " raw ops"
        r["vs_raw_ops"] = r["median_us"] / base[(*key, raw)] if (*key, raw) in base else float("nan")
    return rows


def block_provider(prov: str, args) -> tuple[Callable, UltimusParams]:
    """(a fresh UltimusBlock for `prov`, or its torch.compile; its parameters in ultimus's order)."""
    from ultimus_kernels import UltimusBlock

    torch.manual_seed(0)
    block = UltimusBlock(args.dim, args.attn_dim, backend="reference" if prov.startswith("compile") else prov)
    block = block.to(args.device)
    params = UltimusParams.of(block)
    if prov.startswith("compile"):
        torch._dynamo.reset()
        mode = "max-autotune-no-cudagraphs" if prov.endswith("max-autotune") else None
        return torch.compile(block, mode=mode), params
    return block, params


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


PROVIDERS = ("reference", "compile", "compile-max-autotune", *FUSED)
STACK_PROVIDERS = (*PROVIDERS, *(f"{name}-blocks" for name in FUSED))


def _check_writable(parser, flag: str, path: Optional[str]) -> None:
    """Fail now, not after the sweep, when an output path cannot be written."""
    if path is None:
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        with open(target, "a"):
            pass
        if not existed:
            target.unlink()
    except OSError as exc:
        parser.error(f"{flag} {path}: cannot write there ({exc.strerror or exc})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device to benchmark (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated providers: {', '.join(PROVIDERS)}; with --stack also <backend>-blocks "
        "(default: all that run on the device)",
    )
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma-separated modes: fwd, bwd, fwd+bwd")
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=None,
        help="comma-separated B values >= 1 (default: powers of 4 from 128 to 2^22 on GPU, to 2^16 on CPU)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="comma-separated dtypes: float32, float16, bfloat16 (default: float32 on CPU; all on GPU)",
    )
    p.add_argument(
        "--dim",
        type=_positive_int,
        default=48,
        help=f"D, the block width, >= 1 (default 48; fused providers need D <= {MAX_DIM})",
    )
    p.add_argument(
        "--attn-dim",
        type=_positive_int,
        default=8,
        help=f"d, the attention width, >= 1 (default 8; fused providers need d <= {MAX_ATTN_DIM})",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads, >= 1 (default: torch's default)")
    p.add_argument(
        "--min-run-time", type=_positive_float, default=0.5, help="seconds of timing per point, > 0 (default 0.5)"
    )
    p.add_argument("--max-autotune", action="store_true", help="also time torch.compile(mode='max-autotune') on GPU")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small sweep (B = 128 and 4096, float32, short timing): under a minute on CPU",
    )
    p.add_argument(
        "--stack",
        type=_positive_int,
        default=None,
        metavar="L",
        help="time a stack of L blocks instead of one: each fused backend as one fused stack and as "
        "'<backend>-blocks' (L single fused calls), eager and compile as loops",
    )
    p.add_argument(
        "--model",
        action="store_true",
        help="time one full UltimusNet training step per backend instead (its 4 blocks run as a fused stack)",
    )
    p.add_argument(
        "--model-batch-sizes", type=_int_list, default=[128, 512], help="batch sizes for --model (default 128,512)"
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="time the host path instead: microseconds per call (fwd, fwd+bwd) of each backend's raw ops, "
        "its ops under UltimusFunction, the public UltimusBlock, eager and torch.compile, at small B",
    )
    p.add_argument(
        "--overhead-batch-sizes", type=_int_list, default=[1, 128], help="batch sizes for --overhead (default 1,128)"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write one JSON row per measurement here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of throughput vs B here (sweeps only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.model and args.overhead:
        p.error("--model and --overhead are separate runs: give one")
    if args.plot and (args.model or args.overhead):
        p.error("--plot draws the batch-size sweep; --model and --overhead have no plot (use --json)")
    _check_writable(p, "--json", args.json)
    _check_writable(p, "--plot", args.plot)
    if args.stack is not None and (args.model or args.overhead):
        p.error("--stack times the batch-size sweep; --model already runs UltimusNet's blocks as a stack")
    if args.backends:
        known = STACK_PROVIDERS if args.stack is not None else PROVIDERS
        for name in args.backends.split(","):
            if name not in known:
                p.error(f"--backends: unknown provider {name!r}; choose from {', '.join(known)}")
    gpu = args.device.type == "cuda"
    if args.quick:
        args.batch_sizes = args.batch_sizes or [128, 4096]
        args.min_run_time = min(args.min_run_time, 0.1)
    top = 22 if gpu else 16
    args.batch_sizes = args.batch_sizes or [128] + [4**k for k in range(4, top // 2 + 1)]
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    args.dtype = args.dtype or ("float32" if (args.quick or not gpu) else "float32,bfloat16,float16")
    for t in args.dtype.split(","):
        if t not in DTYPES:
            p.error(f"unknown dtype {t!r}; choose from {', '.join(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    return args


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    name = device_name(device)
    triton_version = _version("triton")
    meta = dict(
        device=name,
        torch=torch.__version__,
        triton=triton_version,
        date=dt.datetime.now().isoformat(timespec="seconds"),
        threads=args.threads,
        command="python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None else None,
    )
    bandwidth, skipped = None, {}
    if args.model:
        rows = model_sweep(args, device)
    elif args.overhead:
        rows = overhead_sweep(args, device)
    else:
        rows, skipped, bandwidth = sweep(args, device)
    if not rows:
        raise SystemExit(
            "error: nothing was timed: no provider runs here with these arguments "
            f"({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'see the messages above'})"
        )
    for r in rows:
        r.update(meta)
    # The table first: a failure to write a file below must not lose what was measured.
    print(
        f"\n{name}  torch {torch.__version__}  triton {triton_version}"
        + (f"  copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else "")
    )
    print(overhead_table(rows) if args.overhead else table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(meta=dict(meta, copy_bandwidth_gbs=bandwidth, skipped=skipped), rows=rows), indent=1) + "\n"
        )
    if args.plot:
        what = f"a stack of {args.stack} Ultimus blocks" if args.stack else "Ultimus block"
        plot(rows, args.plot, f"{what} (D={args.dim}, d={args.attn_dim}) on {name}")


if __name__ == "__main__":
    main()

"""The Triton launches as the offline SASS analysis tool (sass_stats, a development tool beside the
project) should emulate them: `sass_stats_specs(ctx)` mirrors ultimus_kernels/ops/ultimus_triton.py's
launchers (arguments, constexprs, grid, roles of the pointers). Use it as

    python <path to>/sass_stats.py --repo . --kernels cuda --extra bench/sass_specs.py

(`--kernels cuda` adds the CUDA kernels from csrc/ and keeps out the tool's own mirror of the Triton
launchers, which predates them; `--kernels none` for the Triton kernels only). Update this file with
the launchers.
"""

from __future__ import annotations

import os
import sys


def sass_stats_specs(ctx) -> list:
    import torch
    import triton.language as tl

    sys.path.insert(0, str(ctx.repo))
    os.environ.pop("TRITON_INTERPRET", None)
    from ultimus_kernels.ops import ultimus_triton as ut

    B, D, d, sms = ctx.B, ctx.D, ctx.d, ctx.sms
    ut._SM_COUNT[0] = sms  # _num_programs reads the SM count of device 0 from this cache: no GPU needed
    cdiv = lambda a, b: (a + b - 1) // b  # noqa: E731
    specs = []
    for dtype_name in ctx.dtypes:
        dt = getattr(torch, dtype_name)
        acc = tl.float64 if dt == torch.float64 else tl.float32
        es = torch.empty((), dtype=dt).element_size()
        BLOCK_B, BLOCK_DIM, BLOCK_ATT, num_warps, num_stages = ut._tile_config(B, D, d)
        t = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype)  # noqa: E731
        x, y, w, b, wo, bo = t(64, D), t(64, D), t(d, D), t(d), t(D, d), t(D)
        config = f"BLOCK_B={BLOCK_B} BLOCK_DIM={BLOCK_DIM} BLOCK_ATT={BLOCK_ATT} num_warps={num_warps}"
        weights = ("wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr", "wo_ptr", "bo_ptr")

        # forward: see ultimus_triton_fwd (one sample per thread, D and d compile-time constants)
        rows = ut._rows_config(B, D, d)
        pairs = ut._weight_pairs(D, d, rows["WIDTH"], (w, w, w), wo)
        rows_kwargs = dict(ACC=acc, EXACT_EXP=False, EXP2=dt != torch.float64, D=D, d=d, WIDTH=rows["WIDTH"], **pairs)
        rows_kwargs["BLOCK_B"] = rows["BLOCK_B"]
        fwd_grid = cdiv(B, rows["BLOCK_B"])
        rows_config = f"BLOCK_B={rows['BLOCK_B']} WIDTH={rows['WIDTH']} num_warps={rows['num_warps']}"
        specs.append(
            dict(
                kind="triton",
                name=f"triton fwd {dtype_name}",
                fn=ut.ultimus_fwd_kernel,
                args=[x, y, w, b, w, b, w, b, wo, bo, B, D, 1],
                kwargs=dict(HAS_BQ=True, HAS_BK=True, HAS_BV=True, HAS_BO=True, RESIDUAL=True, **rows_kwargs),
                options=dict(num_warps=rows["num_warps"]),
                roles={"x_ptr": ("act_in", es), "y_ptr": ("act_out", es), **{n: ("weight", es) for n in weights}},
                values=lambda tiles: dict(B=B, stride_xb=D),
                grid=fwd_grid,
                grid_emu=lambda tiles, g=fwd_grid: g,
                samples_per_tile=rows["BLOCK_B"],
                persistent=False,
                tiles_real=fwd_grid,
                B=B,
                dram_bytes_per_sample=2 * D * es,
                bench=("triton", "fwd", dtype_name),
                config=rows_config,
            )
        )

        # backward for small blocks: see ultimus_triton_bwd and _rows_backward_config
        bwd_flags = dict(HAS_BQ=True, HAS_BK=True, HAS_BV=True, RESIDUAL=True, NEED_GX=True, NEED_GW=True)
        bwd_roles = {
            "gy_ptr": ("act_in", es),
            "x_ptr": ("act_in", es),
            "gx_ptr": ("act_out", es),
            "part_ptr": ("partial", 4),
            **{n: ("weight", es) for n in weights[:-1]},
        }
        rows_bwd = ut._rows_backward_config(B, D, d, torch.float64 if dt == torch.float64 else torch.float32)
        if rows_bwd is not None:
            rows_tiles = cdiv(B, rows_bwd["BLOCK_B"])
            rows_P = ut._num_programs(rows_tiles, torch.device("cuda", 0))
            num_params = 4 * d * D + 3 * d + D
            rows_partials = t(rows_P, num_params, dtype=torch.float64 if dt == torch.float64 else torch.float32)
            launch = {k: v for k, v in rows_bwd.items() if k != "num_warps"}

            def rows_bwd_values(tiles, P=rows_P, BLOCK_B=rows_bwd["BLOCK_B"]):
                return dict(B=P * tiles * BLOCK_B, stride_xb=D, stride_gyb=D, num_tiles=P * tiles)

            specs.append(
                dict(
                    kind="triton",
                    name=f"triton bwd {dtype_name}",
                    fn=ut.ultimus_bwd_rows_kernel,
                    args=[y, x, y, rows_partials, w, b, w, b, w, b, wo, B, D, 1, D, 1, rows_tiles],
                    kwargs=dict(
                        D=D,
                        d=d,
                        **bwd_flags,
                        ACC=acc,
                        EXACT_EXP=False,
                        EXP2=dt != torch.float64,
                        NUM_PROGRAMS=rows_P,
                        **launch,
                        **pairs,
                    ),
                    options=dict(num_warps=rows_bwd["num_warps"]),
                    roles=bwd_roles,
                    values=rows_bwd_values,
                    grid=rows_P,
                    grid_emu=lambda tiles, P=rows_P: P,
                    samples_per_tile=rows_bwd["BLOCK_B"],
                    persistent=True,
                    tiles_real=rows_tiles,
                    B=B,
                    dram_bytes_per_sample=3 * D * es,
                    bench=("triton", "bwd", dtype_name),
                    config=" ".join(f"{k}={v}" for k, v in rows_bwd.items()) + f" NUM_PROGRAMS={rows_P}",
                )
            )

        # backward for larger blocks, tiles (the stack backward shares its helpers): see ultimus_triton_bwd
        num_tiles = cdiv(B, BLOCK_B)
        P = ut._num_programs(num_tiles, torch.device("cuda", 0))
        num_params = 4 * d * D + 3 * d + D
        partials = t(P, num_params, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        gy, gx = t(64, D), t(64, D)

        def bwd_values(tiles, P=P, BLOCK_B=BLOCK_B):
            return dict(
                B=P * tiles * BLOCK_B, D=D, d=d, stride_xb=D, stride_gyb=D, num_tiles=P * tiles, NUM_PARAMS=num_params
            )

        specs.append(
            dict(
                kind="triton",
                name=f"triton bwd (tiles) {dtype_name}",
                fn=ut.ultimus_bwd_kernel,
                args=[gy, x, gx, partials, w, b, w, b, w, b, wo, B, D, d, D, 1, D, 1, num_tiles, num_params],
                kwargs=dict(
                    **bwd_flags,
                    ACC=acc,
                    EXACT_EXP=False,
                    NUM_PROGRAMS=P,
                    BLOCK_B=BLOCK_B,
                    BLOCK_DIM=BLOCK_DIM,
                    BLOCK_ATT=BLOCK_ATT,
                ),
                options=dict(num_warps=num_warps, num_stages=num_stages),
                roles=bwd_roles,
                values=bwd_values,
                grid=P,
                grid_emu=lambda tiles, P=P: P,
                samples_per_tile=BLOCK_B,
                persistent=True,
                tiles_real=num_tiles,
                B=B,
                dram_bytes_per_sample=3 * D * es,
                bench=("triton", "bwd", dtype_name),
                config=config + f" num_stages={num_stages} NUM_PROGRAMS={P}",
            )
        )

        # the stack of L = 4 blocks: see ultimus_triton_stack_fwd / _bwd (packed parameters, one partial
        # row of L * num_params numbers per program, zeroed and added to tile by tile)
        L = 4
        packed = t(L, num_params, dtype=partials.dtype)
        stack_weights = {"p_ptr": ("weight", partials.element_size())}
        specs.append(
            dict(
                kind="triton",
                name=f"triton stack fwd L={L} {dtype_name}",
                fn=ut.ultimus_stack_fwd_kernel,
                args=[x, y if dt == packed.dtype else packed, y, packed, B, L, D, 1],
                kwargs=dict(
                    HAS_BIAS=True,
                    RESIDUAL=True,
                    H_IS_Y=dt == packed.dtype,
                    **{**rows_kwargs, **ut._weight_pairs(D, d, rows["WIDTH"], (packed,), packed)},
                ),
                options=dict(num_warps=rows["num_warps"]),
                roles={"x_ptr": ("act_in", es), "h_ptr": ("act_out", es), "y_ptr": ("act_out", es), **stack_weights},
                values=lambda tiles, L=L: dict(B=B, L=L, stride_xb=D),
                grid=fwd_grid,
                grid_emu=lambda tiles, g=fwd_grid: g,
                samples_per_tile=rows["BLOCK_B"],
                persistent=False,
                tiles_real=fwd_grid,
                B=B,
                dram_bytes_per_sample=2 * D * es,
                bench=("triton-stack", "fwd", dtype_name),
                config=rows_config + f" L={L}",
            )
        )
        if rows_bwd is not None:  # see ultimus_triton_stack_bwd: per-program scratch rows h and g
            rows_stack_partials = t(rows_P, L * num_params, dtype=rows_partials.dtype)
            scratch = t(2, rows_P * rows_bwd["BLOCK_B"], D, dtype=rows_partials.dtype)
            stack_pairs = ut._weight_pairs(D, d, rows["WIDTH"], (packed,), packed)

            def rows_stack_bwd_values(tiles, L=L):
                return dict(rows_bwd_values(tiles), L=L)

            specs.append(
                dict(
                    kind="triton",
                    name=f"triton stack bwd L={L} {dtype_name}",
                    fn=ut.ultimus_stack_bwd_rows_kernel,
                    args=[y, x, y, rows_stack_partials, packed, scratch[0], scratch[1], B, L, D, 1, D, 1, rows_tiles],
                    kwargs=dict(
                        HAS_BIAS=True,
                        RESIDUAL=True,
                        NEED_GX=True,
                        NEED_GW=True,
                        ACC=acc,
                        EXACT_EXP=False,
                        EXP2=dt != torch.float64,
                        NUM_PROGRAMS=rows_P,
                        D=D,
                        d=d,
                        **launch,
                        **stack_pairs,
                    ),
                    options=dict(num_warps=rows_bwd["num_warps"]),
                    roles={**bwd_roles, **stack_weights, "h_ptr": ("partial", 4), "g_ptr": ("partial", 4)},
                    values=rows_stack_bwd_values,
                    grid=rows_P,
                    grid_emu=lambda tiles, P=rows_P: P,
                    samples_per_tile=rows_bwd["BLOCK_B"],
                    persistent=True,
                    tiles_real=rows_tiles,
                    B=B,
                    dram_bytes_per_sample=3 * D * es,
                    bench=("triton-stack", "bwd", dtype_name),
                    config=" ".join(f"{k}={v}" for k, v in rows_bwd.items()) + f" NUM_PROGRAMS={rows_P} L={L}",
                )
            )
        else:  # the tile kernel (larger blocks)
            stack_partials = t(P, L * num_params, dtype=partials.dtype)

            def stack_bwd_values(tiles, P=P, BLOCK_B=BLOCK_B, L=L):
                return dict(bwd_values(tiles, P, BLOCK_B), L=L)

            specs.append(
                dict(
                    kind="triton",
                    name=f"triton stack bwd L={L} {dtype_name}",
                    fn=ut.ultimus_stack_bwd_kernel,
                    args=[gy, x, gx, stack_partials, packed, B, D, d, L, D, 1, D, 1, num_tiles, num_params],
                    kwargs=dict(
                        HAS_BIAS=True,
                        RESIDUAL=True,
                        NEED_GX=True,
                        NEED_GW=True,
                        ACC=acc,
                        EXACT_EXP=False,
                        NUM_PROGRAMS=P,
                        BLOCK_B=BLOCK_B,
                        BLOCK_DIM=BLOCK_DIM,
                        BLOCK_ATT=BLOCK_ATT,
                    ),
                    options=dict(num_warps=num_warps, num_stages=num_stages),
                    roles={
                        "gy_ptr": ("act_in", es),
                        "x_ptr": ("act_in", es),
                        "gx_ptr": ("act_out", es),
                        "part_ptr": ("partial", 4),
                        **stack_weights,
                    },
                    values=stack_bwd_values,
                    grid=P,
                    grid_emu=lambda tiles, P=P: P,
                    samples_per_tile=BLOCK_B,
                    persistent=True,
                    tiles_real=num_tiles,
                    B=B,
                    dram_bytes_per_sample=3 * D * es,
                    bench=("triton-stack", "bwd", dtype_name),
                    config=config + f" num_stages={num_stages} NUM_PROGRAMS={P} L={L}",
                )
            )
    return specs

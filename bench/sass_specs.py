"""The Triton launches as the offline SASS analysis tool (sass_stats, a development tool beside the
project) should emulate them: `sass_stats_specs(ctx)` mirrors ultimus_kernels/ops/ultimus_triton.py's
launchers (arguments, constexprs, grid, roles of the pointers). Use it as

    python <path to>/sass_stats.py --repo . --kernels cuda --extra bench/sass_specs.py

(`--kernels cuda` adds the generic CUDA kernels from csrc/ and keeps out the tool's own mirror of the
Triton launchers, which predates them; `--kernels none` for the Triton kernels only). The CUDA rows
kernels (D = 48, d = 8) have their own script, bench/sass_cuda.py. Update this file with the launchers.
"""

from __future__ import annotations

import os
import sys


def _spec(B, name, fn, args, kwargs, num_warps, roles, values, grid, samples_per_tile, bytes_per_sample, bench,
          config, persistent=False, tiles=None, num_stages=None):  # fmt: skip
    """One launch in the form sass_stats reads (see its README): a persistent grid of `grid` programs
    covers `tiles` tiles; otherwise one program per tile."""
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    return dict(
        kind="triton", name=name, fn=fn, args=args, kwargs=kwargs, options=options, roles=roles, values=values,
        grid=grid, grid_emu=lambda tiles_per_program: grid, samples_per_tile=samples_per_tile,
        persistent=persistent, tiles_real=grid if tiles is None else tiles, B=B,
        dram_bytes_per_sample=bytes_per_sample, bench=bench, config=config,
    )  # fmt: skip


def sass_stats_specs(ctx) -> list:
    import torch
    import triton.language as tl

    sys.path.insert(0, str(ctx.repo))
    os.environ.pop("TRITON_INTERPRET", None)
    from ultimus_kernels.ops import ultimus_triton as ut

    B, D, d, sms = ctx.B, ctx.D, ctx.d, ctx.sms
    ut._SM_COUNT[0] = sms  # _num_programs reads the SM count of device 0 from this cache: no GPU needed
    cdiv = lambda a, b: (a + b - 1) // b  # noqa: E731
    cuda = torch.device("cuda", 0)
    L = 4  # the stack analysed
    num_params = 4 * d * D + 3 * d + D
    specs = []
    for dtype_name in ctx.dtypes:
        dt = getattr(torch, dtype_name)
        acc_dtype = torch.float64 if dt == torch.float64 else torch.float32
        acc = tl.float64 if dt == torch.float64 else tl.float32
        es = torch.empty((), dtype=dt).element_size()
        t = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype)  # noqa: E731
        x, y, w, b, wo, bo = t(64, D), t(64, D), t(d, D), t(d), t(D, d), t(D)
        rw, rb, rwo, rbo = ut._per_sample_weights(B, w, b, wo, bo)  # as the per-sample launchers pass them
        packed = t(L, num_params, dtype=acc_dtype)
        weights = ("wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr", "wo_ptr", "bo_ptr")
        weight_roles = {n: ("weight", es) for n in weights}
        rw_roles = {n: ("weight", rw.element_size()) for n in weights}
        stack_roles = {"p_ptr": ("weight", packed.element_size())}
        bwd_roles = {"gy_ptr": ("act_in", es), "x_ptr": ("act_in", es), "gx_ptr": ("act_out", es)}
        bwd_roles["part_ptr"] = ("partial", 4)
        flags = dict(HAS_BQ=True, HAS_BK=True, HAS_BV=True, RESIDUAL=True)
        need = dict(NEED_GX=True, NEED_GW=True)
        exp = dict(ACC=acc, EXACT_EXP=False, EXP2=dt != torch.float64)

        # forward and stack forward: see ultimus_triton_fwd, ultimus_triton_stack_fwd (one sample per thread)
        rows = ut._rows_config(B, D, d)
        launch = dict(D=D, d=d, WIDTH=rows["WIDTH"], BLOCK_B=rows["BLOCK_B"], **exp)
        grid = cdiv(B, rows["BLOCK_B"])
        config = f"BLOCK_B={rows['BLOCK_B']} WIDTH={rows['WIDTH']} num_warps={rows['num_warps']}"
        dots = ut._half_dots(x, D, d)  # x is a CPU tensor: this asks only the dtype and sizes
        if dots is None:
            specs.append(_spec(
                B, f"triton fwd {dtype_name}", ut.ultimus_fwd_kernel, [x, y, rw, rb, rw, rb, rw, rb, rwo, rbo, B, D, 1],
                dict(**flags, HAS_BO=True, **launch), rows["num_warps"],
                {"x_ptr": ("act_in", es), "y_ptr": ("act_out", es), **rw_roles}, lambda tiles: dict(B=B, stride_xb=D),
                grid, rows["BLOCK_B"], 2 * D * es, ("triton", "fwd", dtype_name), config,
            ))  # fmt: skip
        else:  # see ultimus_triton_fwd: the tensor-core forward, a persistent grid of 128-row tiles
            tiles = cdiv(B, 128)
            P = ut._num_programs(tiles, cuda)

            def half_values(tiles_per_program, P=P):
                return dict(B=P * tiles_per_program * 128, stride_xb=D, num_tiles=P * tiles_per_program, num_programs=P)

            specs.append(_spec(
                B, f"triton fwd {dtype_name}", ut.ultimus_fwd_half_dot_kernel,
                [x, y, w, b, w, b, w, b, wo, bo, B, D, 1, tiles, P],
                dict(**flags, HAS_BO=True, D=D, d=d, DOTS=dots, HALF=ut._TL_HALF[dt], BLOCK_B=128),
                4, {"x_ptr": ("act_in", es), "y_ptr": ("act_out", es), **weight_roles}, half_values, P, 128,
                2 * D * es, ("triton", "fwd", dtype_name), f"BLOCK_B=128 num_warps=4 DOTS={dots} NUM_PROGRAMS={P}",
                persistent=True, tiles=tiles, num_stages=ut._BARRIERED_LOOP,
            ))  # fmt: skip
        h_is_y = dt == packed.dtype
        if not ut._stack_dots(x, D, d):
            specs.append(_spec(
                B, f"triton stack fwd L={L} {dtype_name}", ut.ultimus_stack_fwd_kernel,
                [x, y if h_is_y else packed, y, packed, B, L, D, 1],
                dict(HAS_BIAS=True, RESIDUAL=True, H_IS_Y=h_is_y, **launch), rows["num_warps"],
                {"x_ptr": ("act_in", es), "h_ptr": ("act_out", es), "y_ptr": ("act_out", es), **stack_roles},
                lambda tiles: dict(B=B, L=L, stride_xb=D), grid, rows["BLOCK_B"], 2 * D * es,
                ("triton-stack", "fwd", dtype_name), config + f" L={L}",
            ))  # fmt: skip
        else:  # see ultimus_triton_stack_fwd: the stack forward on the tensor cores, 128-row tiles, persistent
            tiles = cdiv(B, 128)
            P = ut._num_programs(tiles, cuda)

            def stack_values(tiles_per_program, P=P):
                n = P * tiles_per_program
                return dict(B=n * 128, L=L, stride_xb=D, num_tiles=n, num_programs=P)

            specs.append(_spec(
                B, f"triton stack fwd L={L} {dtype_name}", ut.ultimus_stack_fwd_dot_kernel,
                [x, y, packed, B, L, D, 1, tiles, P], dict(D=D, d=d, HAS_BIAS=True, RESIDUAL=True, BLOCK_B=128), 4,
                {"x_ptr": ("act_in", es), "y_ptr": ("act_out", es), **stack_roles}, stack_values, P, 128,
                2 * D * es, ("triton-stack", "fwd", dtype_name), f"BLOCK_B=128 num_warps=4 NUM_PROGRAMS={P} L={L}",
                persistent=True, tiles=tiles, num_stages=ut._BARRIERED_LOOP,
            ))  # fmt: skip

        # backward and stack backward for small blocks: see ultimus_triton_bwd, _rows_backward_config
        rows_bwd = ut._rows_backward_config(B, D, d, acc_dtype, (acc_dtype,))  # the stack's; the single's below
        if rows_bwd is not None:
            tiles = cdiv(B, rows_bwd["BLOCK_B"])
            P = ut._num_programs(tiles, cuda)
            launch = {k: v for k, v in rows_bwd.items() if k != "num_warps"}
            launch.update(D=D, d=d, **exp)
            config = " ".join(f"{k}={v}" for k, v in rows_bwd.items()) + f" NUM_PROGRAMS={P}"

            def values(tiles_per_program, P=P, BLOCK_B=rows_bwd["BLOCK_B"]):
                n = P * tiles_per_program
                return dict(B=n * BLOCK_B, stride_xb=D, stride_gyb=D, num_tiles=n, num_programs=P, L=L)

            single = dict(launch, PRECISION=ut._product_precision(acc_dtype, (dt, dt)))  # its rows: x and gy
            if dots != "split":
                specs.append(_spec(
                    B, f"triton bwd {dtype_name}", ut.ultimus_bwd_rows_kernel,
                    [y, x, y, t(P, num_params, dtype=acc_dtype), rw, rb, rw, rb, rw, rb, rwo, B, D, 1, D, 1, tiles, P],
                    dict(**flags, **need, **single), rows_bwd["num_warps"], {**bwd_roles, **rw_roles}, values,
                    P, rows_bwd["BLOCK_B"], 3 * D * es, ("triton", "bwd", dtype_name), config, persistent=True,
                    tiles=tiles,
                ))  # fmt: skip
            else:  # see ultimus_triton_bwd: the tensor-core backward, the rows kernel's grid
                specs.append(_spec(
                    B, f"triton bwd {dtype_name}", ut.ultimus_bwd_half_dot_kernel,
                    [y, x, y, t(P, num_params, dtype=acc_dtype), t(P * rows_bwd["BLOCK_B"], 4 * d, dtype=torch.float32),
                     w, b, w, b, w, b, wo, B, D, 1, D, 1, tiles, P],
                    dict(**flags, **need, D=D, d=d, HALF=ut._TL_HALF[dt], BLOCK_B=rows_bwd["BLOCK_B"]),
                    4, {**bwd_roles, **weight_roles, "scratch_ptr": ("partial", 4)},
                    values, P,
                    rows_bwd["BLOCK_B"],
                    3 * D * es, ("triton", "bwd", dtype_name),
                    f"BLOCK_B={rows_bwd['BLOCK_B']} num_warps=4 NUM_PROGRAMS={P}", persistent=True, tiles=tiles,
                    num_stages=ut._BARRIERED_LOOP,
                ))  # fmt: skip
            scratch = t(P * 2 * rows_bwd["BLOCK_B"], D, dtype=acc_dtype), t(P * rows_bwd["BLOCK_B"], D, dtype=acc_dtype)
            specs.append(_spec(
                B, f"triton stack bwd L={L} {dtype_name}", ut.ultimus_stack_bwd_rows_kernel,
                [y, x, y, t(P, L * num_params, dtype=acc_dtype), packed, *scratch, B, L, D, 1, D, 1,
                 tiles, P],
                dict(HAS_BIAS=True, RESIDUAL=True, **need, **launch), rows_bwd["num_warps"],
                {**bwd_roles, **stack_roles, "h_ptr": ("partial", 4), "g_ptr": ("partial", 4)}, values, P,
                rows_bwd["BLOCK_B"], 3 * D * es, ("triton-stack", "bwd", dtype_name), config + f" L={L}",
                persistent=True, tiles=tiles, num_stages=ut._BARRIERED_LOOP,
            ))  # fmt: skip

        # the tile kernels (the backward of larger blocks; the old design's numbers for D = 48, d = 8)
        BLOCK_B, BLOCK_DIM, BLOCK_ATT, num_warps, num_stages = ut._tile_config(B, D, d)
        tiles = cdiv(B, BLOCK_B)
        P = ut._num_programs(tiles, cuda)
        launch = dict(ACC=acc, EXACT_EXP=False, BLOCK_B=BLOCK_B, BLOCK_DIM=BLOCK_DIM)
        launch["BLOCK_ATT"] = BLOCK_ATT
        config = f"BLOCK_B={BLOCK_B} BLOCK_DIM={BLOCK_DIM} BLOCK_ATT={BLOCK_ATT} num_warps={num_warps} "
        config += f"num_stages={num_stages} NUM_PROGRAMS={P}"

        def tile_values(tiles_per_program, P=P, BLOCK_B=BLOCK_B):
            n = P * tiles_per_program
            sizes = dict(B=n * BLOCK_B, D=D, d=d, stride_xb=D, stride_gyb=D, num_tiles=n, NUM_PARAMS=num_params)
            return dict(sizes, num_programs=P, L=L)

        specs.append(_spec(
            B, f"triton bwd (tiles) {dtype_name}", ut.ultimus_bwd_kernel,
            [y, x, y, t(P, num_params, dtype=acc_dtype), w, b, w, b, w, b, wo, B, D, d, D, 1, D, 1, tiles, num_params,
             P],
            dict(**flags, **need, **launch), num_warps, {**bwd_roles, **weight_roles}, tile_values, P, BLOCK_B,
            3 * D * es, ("triton", "bwd", dtype_name), config, persistent=True, tiles=tiles, num_stages=num_stages,
        ))  # fmt: skip
        specs.append(_spec(
            B, f"triton stack bwd (tiles) L={L} {dtype_name}", ut.ultimus_stack_bwd_kernel,
            [y, x, y, t(P, L * num_params, dtype=acc_dtype), packed, B, D, d, L, D, 1, D, 1, tiles, num_params, P],
            dict(HAS_BIAS=True, RESIDUAL=True, **need, **launch), num_warps, {**bwd_roles, **stack_roles},
            tile_values, P, BLOCK_B, 3 * D * es, ("triton-stack", "bwd", dtype_name), config + f" L={L}",
            persistent=True, tiles=tiles, num_stages=ut._BARRIERED_LOOP,
        ))  # fmt: skip
    return specs

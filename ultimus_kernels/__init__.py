"""ultimus-kernels: the Ultimus attention block, fused into one GPU kernel, with exact gradients.

    from ultimus_kernels import ultimus, UltimusBlock, available_backends
    y = ultimus(x, wq, bq, wk, bk, wv, bv, wo, bo, residual=True, backend="auto")
"""
from .checks import MAX_ATTN_DIM, MAX_DIM
from .dispatch import BACKENDS, available_backends, backend_report, ultimus
from .module import UltimusBlock
from .reference import ultimus_reference

__all__ = [
    "BACKENDS", "MAX_ATTN_DIM", "MAX_DIM", "UltimusBlock", "available_backends", "backend_report",
    "ultimus", "ultimus_reference",
]
__version__ = "0.1.0"

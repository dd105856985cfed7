"""ultimus-kernels: the Ultimus attention block, fused into one GPU kernel, with exact gradients.

from ultimus_kernels import ultimus, ultimus_stack, UltimusBlock, UltimusStack, available_backends
y = ultimus(x, wq, bq, wk, bk, wv, bv, wo, bo, residual=True, backend="auto")
y = ultimus_stack(x, [block_params, ...], residual=True, backend="auto")  # blocks in one launch
"""

from .checks import MAX_ATTN_DIM, MAX_DIM, SUPPORTED_DTYPES, UltimusParams
from .dispatch import (
    BACKEND_DEVICE,
    BACKENDS,
    FUSED_BACKENDS,
    available_backends,
    backend_report,
    load_backends,
    ultimus,
    ultimus_stack,
)
from .module import UltimusBlock, UltimusStack
from .ops.autograd import UltimusFunction, UltimusStackFunction
from .reference import ultimus_reference, ultimus_stack_reference

# Load the built extensions and the Triton kernels and register their ops (fakes, autograd, vmap) now,
# so that torch.export.load, opcheck and torch.compile work in a fresh process, and no
# call pays for probing. Never raises: `python -m ultimus_kernels` says what is missing and why.
load_backends()

__all__ = [
    "BACKEND_DEVICE",
    "BACKENDS",
    "FUSED_BACKENDS",
    "MAX_ATTN_DIM",
    "MAX_DIM",
    "SUPPORTED_DTYPES",
    "UltimusBlock",
    "UltimusFunction",
    "UltimusParams",
    "UltimusStack",
    "UltimusStackFunction",
    "available_backends",
    "backend_report",
    "load_backends",
    "ultimus",
    "ultimus_reference",
    "ultimus_stack",
    "ultimus_stack_reference",
]
__version__ = "0.1.0"

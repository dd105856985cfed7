"""`UltimusBlock`: the block as an nn.Module whose backend can be switched at any time."""

from __future__ import annotations

from torch import Tensor, nn

from .checks import check_residual
from .dispatch import BACKENDS, ultimus


class UltimusBlock(nn.Module):
    """One Ultimus attention block: (B, dim) -> (B, dim).

    Submodules `q`, `k`, `v` (Linear dim -> attn_dim) and `out` (Linear attn_dim -> dim); the
    state_dict does not depend on `backend`, which may be reassigned at any time.
    """

    def __init__(
        self, dim: int = 48, attn_dim: int = 8, residual: bool = True, bias: bool = True, backend: str = "auto"
    ):
        super().__init__()
        check_residual(residual)
        self.dim, self.attn_dim, self.residual = dim, attn_dim, residual
        self.q = nn.Linear(dim, attn_dim, bias=bias)
        self.k = nn.Linear(dim, attn_dim, bias=bias)
        self.v = nn.Linear(dim, attn_dim, bias=bias)
        self.out = nn.Linear(attn_dim, dim, bias=bias)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"UltimusBlock: unknown backend '{name}'; choose one of {('auto',) + BACKENDS}")
        self._backend = name

    def forward(self, x: Tensor) -> Tensor:
        # The parameters straight from the submodules' dicts: nn.Module.__getattr__ costs ~1 us per
        # lookup, 16 lookups here, as much as the fused kernel itself at the training batch on a CPU.
        # (A parametrized or pruned weight is not in _parameters: then the attribute, computed.)
        modules = self._modules
        q, k, v, out = (_weight_and_bias(modules[name]) for name in ("q", "k", "v", "out"))
        return ultimus(x, *q, *k, *v, *out, residual=self.residual, backend=self._backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_dim={self.attn_dim}, residual={self.residual}, backend={self.backend!r}"


def _weight_and_bias(linear: nn.Module) -> tuple:
    params = linear._parameters
    weight = params["weight"] if "weight" in params else linear.weight
    bias = params["bias"] if "bias" in params else linear.bias
    return weight, bias

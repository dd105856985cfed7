"""`UltimusBlock`: the block as an nn.Module whose backend can be switched at any time."""

from __future__ import annotations

from torch import Tensor, nn

from .checks import check_residual
from .dispatch import BACKENDS, ultimus, ultimus_stack


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
        self._backend = _known_backend("UltimusBlock", name)

    def forward(self, x: Tensor) -> Tensor:
        # The parameters straight from the submodules' dicts: nn.Module.__getattr__ costs ~1 us per
        # lookup, 16 lookups here, as much as the fused kernel itself at the training batch on a CPU.
        # (A parametrized or pruned weight is not in _parameters: then the attribute, computed.)
        modules = self._modules
        q, k, v, out = (_weight_and_bias(modules[name]) for name in ("q", "k", "v", "out"))
        return ultimus(x, *q, *k, *v, *out, residual=self.residual, backend=self._backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_dim={self.attn_dim}, residual={self.residual}, backend={self.backend!r}"


class UltimusStack(nn.Sequential):
    """`num_blocks` UltimusBlocks run as one fused stack (`ultimus_stack`): one launch forward and one
    backward for all of them, the activations between blocks kept on chip.

    It is an nn.Sequential of UltimusBlocks: it indexes, iterates and slices like one, and its
    state_dict has the same keys ("0.q.weight", ...), so a checkpoint of a Sequential of blocks loads
    into it and back. `backend` applies to every block; a block whose own settings differ from the
    stack's (another backend or residual assigned to it directly) makes the stack run block by block.
    """

    def __init__(
        self,
        num_blocks: int,
        dim: int = 48,
        attn_dim: int = 8,
        residual: bool = True,
        bias: bool = True,
        backend: str = "auto",
    ):
        check_residual(residual)
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"UltimusStack: num_blocks must be an integer >= 0, got {num_blocks!r}")
        super().__init__(
            *(UltimusBlock(dim, attn_dim, residual=residual, bias=bias, backend=backend) for _ in range(num_blocks))
        )
        self.dim, self.attn_dim, self.residual = dim, attn_dim, residual
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = _known_backend("UltimusStack", name)
        for block in self:
            block.backend = name

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a stack of those blocks (nn.Sequential would call __init__ with them)
            stack = UltimusStack(0, self.dim, self.attn_dim, self.residual, backend=self._backend)
            for name, block in list(self._modules.items())[idx]:
                stack.add_module(name, block)
            return stack
        return super().__getitem__(idx)

    def forward(self, x: Tensor) -> Tensor:
        blocks = list(self._modules.values())
        if not all(
            isinstance(b, UltimusBlock) and b._backend == self._backend and b.residual == self.residual for b in blocks
        ):
            for block in blocks:  # blocks set apart (or replaced): each on its own terms
                x = block(x)
            return x
        params = [
            (
                *_weight_and_bias(m["q"]),
                *_weight_and_bias(m["k"]),
                *_weight_and_bias(m["v"]),
                *_weight_and_bias(m["out"]),
            )
            for m in (b._modules for b in blocks)
        ]
        return ultimus_stack(x, params, residual=self.residual, backend=self._backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_dim={self.attn_dim}, residual={self.residual}, backend={self.backend!r}"


def _known_backend(owner: str, name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{owner}: unknown backend '{name}'; choose one of {('auto',) + BACKENDS}")
    return name


def _weight_and_bias(linear: nn.Module) -> tuple:
    params = linear._parameters
    weight = params["weight"] if "weight" in params else linear.weight
    bias = params["bias"] if "bias" in params else linear.bias
    return weight, bias

"""OFT (Qiu et al., 2023): `W' = W Q` with a block-diagonal orthogonal `Q` from the exact Cayley map.

`Q = (I + S)(I - S)^-1` with `S = (R - R^T) / 2` skew-symmetric, one R per block, R = 0 at start (so the
layer starts as the base layer). As for ETHER, `x W'^T = (x Q^T) W^T`: the transform is applied to the
activations and the frozen weight gets no gradient. Unlike a reflection, each block is a dense k x k
matrix, so the cost per token is O(d^2 / n).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdapterLinear


class BlockDiagonalLinear(AdapterLinear):
    """A frozen Linear whose input is multiplied by a block-diagonal `M` first: `W' = W M`.

    Subclasses define `block_matrices()` -> (n, k, k). Shared by OFT and Naive.
    """

    def block_matrices(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        m = self.block_matrices().to(x.dtype)
        xb = x.unflatten(-1, (self.n_blocks, -1))
        # per block: x_b M_b^T
        x = torch.einsum("...nj,nij->...ni", xb, m).flatten(-2)
        return F.linear(x, self.base_layer.weight, self.base_layer.bias)

    def input_transform(self) -> torch.Tensor:
        return torch.block_diag(*self.block_matrices().double())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight.float()
        return torch.einsum("onj,nji->oni", w.unflatten(-1, (self.n_blocks, -1)), self.block_matrices().float()).flatten(-2)

    def extra_repr(self):
        return f"n_blocks={self.n_blocks}"


class OFTLinear(BlockDiagonalLinear):
    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__(base_layer, n_blocks)
        k = base_layer.in_features // n_blocks
        self.oft_r = nn.Parameter(torch.zeros(n_blocks, k, k, device=base_layer.weight.device))

    def block_matrices(self):
        r = self.oft_r
        s = (r - r.transpose(-1, -2)) / 2
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        # S is skew, so (I+S) and (I-S)^-1 commute: Q = (I-S)^-1 (I+S), one batched solve.
        return torch.linalg.solve(eye - s, eye + s)

"""OFT (Qiu et al., 2023): `W' = W Q` with a block-diagonal orthogonal `Q` from the exact Cayley map.

`Q = (I + S)(I - S)^-1` with `S = (R - R^T) / 2` skew-symmetric, one R per block, R = 0 at start (so the
layer starts as the base layer). As for ETHER, `x W'^T = (x Q^T) W^T`: the transform is applied to the
activations and the frozen weight gets no gradient. Unlike a reflection, each block is a dense k x k
matrix, so the cost per token is O(d^2 / n).
"""
import torch
import torch.nn as nn

from .base import BlockDiagonalLinear


class OFTLinear(BlockDiagonalLinear):
    method = "oft"

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

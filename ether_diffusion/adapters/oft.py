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
        # S is skew, so (I+S) and (I-S)^-1 commute: Q = (I-S)^-1 (I+S).
        return solve_blocks(eye - s, eye + s)


def solve_blocks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.linalg.solve` over a batch of blocks. On the CPU with more than one torch thread, torch runs the
    batch's LU factorisations in parallel, and MKL's row swaps are not safe to run so: it prints "Parameter 6
    was incorrect on entry to SLASWP" and hangs (seen here with 4 blocks of 160 after `torch.set_num_threads(2)`;
    pytorch/pytorch#142815, #141358). There the blocks are solved one at a time, each with every thread."""
    if a.device.type != "cpu" or torch.get_num_threads() == 1 or a.shape[0] == 1:
        return torch.linalg.solve(a, b)
    return torch.stack([torch.linalg.solve(a_i, b_i) for a_i, b_i in zip(a, b)])

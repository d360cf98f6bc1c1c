"""Naive: `W' = W N` with an unconstrained block-diagonal `N`, identity at start (the paper's baseline
for what happens without any constraint on the transform)."""
import torch
import torch.nn as nn

from .base import BlockDiagonalLinear


class NaiveLinear(BlockDiagonalLinear):
    method = "naive"

    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__(base_layer, n_blocks)
        k = base_layer.in_features // n_blocks
        eye = torch.eye(k, device=base_layer.weight.device)
        self.naive_n = nn.Parameter(eye.repeat(n_blocks, 1, 1))

    def block_matrices(self):
        return self.naive_n

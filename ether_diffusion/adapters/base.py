"""What every wrapper of ours shares: it keeps the frozen base Linear and stands in for it; and the
block-diagonal input transform OFT and Naive share."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class StandsInForLinear(nn.Module):
    """A module in a Linear's place that keeps it as `base_layer`: code that reads `.weight`/`.bias` keeps working."""

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


class AdapterLinear(StandsInForLinear):
    """A frozen `nn.Linear` plus a transform with `n_blocks` blocks.

    Subclasses set `method` (their name in `adapters.methods.METHODS`) and implement `forward`,
    `merged_weight()` (the W' to fold in), `input_transform()` and `output_transform()` (dense float64
    matrices, for checks and analysis only; None where absent); a low-rank method also `low_rank_delta()`.
    """

    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__()
        self.base_layer = base_layer
        self.n_blocks = n_blocks
        base_layer.requires_grad_(False)

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def input_transform(self) -> torch.Tensor:
        raise NotImplementedError

    def output_transform(self) -> torch.Tensor | None:
        return None

    def transforms(self) -> list[torch.Tensor]:
        return [t for t in (self.input_transform(), self.output_transform()) if t is not None]


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


class PerSampleBlocks(nn.Module):
    """Several OFT or Naive adapters of one layer, one per sample of a batch (`adapter_batch`):
    `y = (x M^T) W^T + b` with each sample's block-diagonal M (as `BlockDiagonalLinear`)."""

    def __init__(self, layers):
        super().__init__()
        self.register_buffer("blocks", torch.stack([layer.block_matrices().detach().float() for layer in layers]))

    def forward(self, x, base, index):
        m = self.blocks[index].to(x.dtype)
        x = torch.einsum("btnj,bnij->btni", x.unflatten(-1, (m.shape[1], -1)), m).flatten(-2)
        return F.linear(x, base.weight, base.bias)

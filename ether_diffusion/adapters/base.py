"""What every wrapper of ours shares: it keeps the frozen base Linear and stands in for it."""
import torch
import torch.nn as nn


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` plus a transform with `n_blocks` blocks.

    Subclasses implement `forward`, `merged_weight()` (the W' to fold in), `input_transform()` and
    `output_transform()` (dense float64 matrices, for checks and analysis only; None where absent).
    """

    def __init__(self, base_layer: nn.Linear, n_blocks: int):
        super().__init__()
        self.base_layer = base_layer
        self.n_blocks = n_blocks
        base_layer.requires_grad_(False)

    # The wrapper stands in for the Linear: code that reads `.weight`/`.bias` keeps working.
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def input_transform(self) -> torch.Tensor:
        raise NotImplementedError

    def output_transform(self) -> torch.Tensor | None:
        return None

"""ETHER and ETHER+: finetuning by hyperplane reflections (Bini et al., ICML 2024).

`nn.Linear` computes `y = x W^T + b` with `W` of shape (out, in). The paper's weight is `W^T`, so its
transforms read, on our `W`:

    ETHER    W' = W H,         H = I - 2 u u^T              (u unit, one per block of the input)
    ETHER+   W' = H~ W H,      H = I - u u^T + v v^T         (input side), H~ the same on the output side

H is symmetric, so `x W'^T = (x H) W^T`: the reflection can be applied to the activations, O(d) per
token, instead of building the d x d matrix and multiplying weights every step as the reference code and
PEFT's HRA do. The frozen weight never receives a gradient and nothing of size out x in is formed.

All transforms are block-diagonal with `n` blocks: the input is split into n chunks of in/n features and
each chunk is reflected by its own vector. Vectors are stored unnormalised and normalised in every forward.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdapterLinear


def _unit(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Normalise in float32 (the parameters' dtype) and only then cast to the activations' dtype, so fp16
    # training does not lose the vector's direction in the norm.
    return F.normalize(vectors.float(), dim=-1).to(dtype)


def _block_update(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, shift: torch.Tensor | None = None):
    """`x + (x_b a_b - shift_b) c_b^T` for every block b of x's last dim; a, c of shape (n, k, r).

    Two batched matmuls over the n blocks (the (n, tokens, k) view of x costs no copy): 4 r d FLOPs per
    token whatever n is, two passes over x, and autograd keeps x and the small (n, tokens, r) projections.
    """
    n, k, _ = a.shape
    xb = x.reshape(-1, n, k).transpose(0, 1)
    proj = torch.bmm(xb, a)
    if shift is not None:
        proj = proj - shift
    return torch.baddbmm(xb, proj, c.transpose(1, 2)).transpose(0, 1).reshape(x.shape)


def _plus_factors(u: torch.Tensor, v: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # H+ = I - u u^T + v v^T = I + [u v] [-u v]^T: a rank-2 update per block, (n, k, 2) factors.
    # One normalisation for both vectors and no sign tensor (a host-to-device copy per layer on a GPU).
    uv = _unit(torch.stack([u, v]), dtype)  # (2, n, k)
    return uv.permute(1, 2, 0), torch.stack([-uv[0], uv[1]], -1)


def reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`x H` for the block-diagonal Householder reflection `H = I - 2 u u^T`, u of shape (n, d/n)."""
    u = _unit(u, x.dtype).unsqueeze(-1)
    return _block_update(x, u, -2 * u)


def reflect_plus(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`x H+` for the block-diagonal `H+ = I - u u^T + v v^T` (ETHER+), u and v of shape (n, d/n)."""
    return _block_update(x, *_plus_factors(u, v, x.dtype))


def dense_blocks(u: torch.Tensor, v: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    """The (n, k, k) blocks of H (ETHER) or, with v, H+ (ETHER+) as dense matrices, differentiable. For
    checks, analysis and the paper's dense-H reference (`analysis.DenseETHERLinear`), never for our training
    forward. Vectors are normalised in float64 when `dtype` is, so the blocks are orthogonal to rounding."""

    def unit(w):
        return F.normalize(w.to(torch.promote_types(w.dtype, dtype)), dim=-1).to(dtype)

    def outer(w):
        return w[:, :, None] * w[:, None, :]

    u = unit(u)
    eye = torch.eye(u.shape[-1], dtype=dtype, device=u.device)
    return eye - 2 * outer(u) if v is None else eye - outer(u) + outer(unit(v))


def block_columns(u: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The (n, k) block vectors, normalised, as the zero-padded (n*k, n) matrix U with block i's vector in
    column i: the block-diagonal `I - 2 u u^T` is `I - 2 U U^T`. Differentiable."""
    unit = F.normalize(u.to(torch.promote_types(u.dtype, dtype)), dim=-1).to(dtype)
    return torch.block_diag(*unit[:, :, None])


def low_rank_delta(weight: torch.Tensor, u, v=None, u_out=None, v_out=None, dtype=torch.float64):
    """(up, down) with `W' - W = up @ down` exactly, for ETHER (`u` only) or ETHER+ (all four vectors).

    ETHER:  W' - W = -2 W U U^T                       -> up = -2 W U (out x n), down = U^T (n x in).
    ETHER+: H = I + M S M^T with M = [U V], S = diag(-1 (n times), +1 (n times)), the same on the output
    side (M~, out x 2n); W' = H~ W H = W + (W M S) M^T + (M~ S) (M~^T W H):
            up = [W M S, M~ S] (out x 4n), down = [M^T; M~^T W H] (4n x in).
    So the update has rank <= n (ETHER) or <= 4n (ETHER+), the bias is untouched. One function for the LoRA
    export (float64, then balanced) and for anything that wants the update in factored form; differentiable.
    """
    w = weight.to(dtype)
    big_u = block_columns(u, dtype)
    if v is None:
        return -2 * (w @ big_u), big_u.T
    n = big_u.shape[1]
    sign = torch.cat([-torch.ones(n, dtype=dtype, device=w.device), torch.ones(n, dtype=dtype, device=w.device)])
    m = torch.cat([big_u, block_columns(v, dtype)], 1)
    m_out = torch.cat([block_columns(u_out, dtype), block_columns(v_out, dtype)], 1)
    wm = w @ m
    w_h = w + (wm * sign) @ m.T
    up = torch.cat([wm * sign, m_out * sign], 1)
    down = torch.cat([m.T, m_out.T @ w_h], 0)
    return up, down


def block_matrix(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """The whole block-diagonal transform in float64 (checks and analysis only)."""
    return torch.block_diag(*dense_blocks(u, v))


class ETHERLinear(AdapterLinear):
    """Wraps a frozen `nn.Linear`; `plus=False` is ETHER, `plus=True` is ETHER+.

    ETHER starts from a random reflection (the method: the transform is never the identity).
    ETHER+ starts with `v = u` on both sides, i.e. exactly the base layer.
    """

    def __init__(self, base_layer: nn.Linear, n_blocks: int, plus: bool, generator=None):
        super().__init__(base_layer, n_blocks)
        self.plus = plus
        d_in, d_out = base_layer.in_features, base_layer.out_features
        dev = base_layer.weight.device

        def random_vectors(d):
            # Parameters stay float32 whatever the base dtype; mixed precision casts in forward.
            return torch.randn(n_blocks, d // n_blocks, generator=generator).to(dev)

        self.ether_u = nn.Parameter(random_vectors(d_in))
        if plus:
            self.ether_v = nn.Parameter(self.ether_u.detach().clone())
            self.ether_u_out = nn.Parameter(random_vectors(d_out))
            self.ether_v_out = nn.Parameter(self.ether_u_out.detach().clone())

    @property
    def method(self) -> str:
        return "ether+" if self.plus else "ether"

    def forward(self, x):
        w, b = self.base_layer.weight, self.base_layer.bias
        if not self.plus:
            return F.linear(reflect(x, self.ether_u), w, b)
        z = F.linear(reflect_plus(x, self.ether_u, self.ether_v), w, b)
        a, c = _plus_factors(self.ether_u_out, self.ether_v_out, z.dtype)
        # The bias is added after the output side: H~(z - b) + b. Folding it into F.linear and shifting the
        # projections by b's saves a pass over the output.
        shift = None if b is None else torch.bmm(b.to(z.dtype).view(self.n_blocks, 1, -1), a)
        return _block_update(z, a, c, shift)

    def input_transform(self) -> torch.Tensor:
        return block_matrix(self.ether_u, self.ether_v if self.plus else None)

    def output_transform(self) -> torch.Tensor | None:
        return block_matrix(self.ether_u_out, self.ether_v_out) if self.plus else None

    def low_rank_delta(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with `merged_weight() - W = up @ down` (see `low_rank_delta`)."""
        vectors = (self.ether_u, self.ether_v, self.ether_u_out, self.ether_v_out) if self.plus else (self.ether_u,)
        return low_rank_delta(self.base_layer.weight, *vectors, dtype=dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """`W' = H~ W H` through the same O(d) updates as forward: W's rows are reflected on the input
        side (`W H`), then its columns on the output side (`H~ W` = `(W^T H~)^T`)."""
        w = self.base_layer.weight.float()
        if not self.plus:
            return reflect(w, self.ether_u)
        w = reflect_plus(w, self.ether_u, self.ether_v)
        return reflect_plus(w.T, self.ether_u_out, self.ether_v_out).T

    def extra_repr(self):
        return f"n_blocks={self.n_blocks}, plus={self.plus}"

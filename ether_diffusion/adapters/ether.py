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

How the training forward runs. Each side is `H = I + alpha C^T A` per block, `A` holding the r unit vectors
as rows: ETHER (r = 1) has C = A = u and alpha = -2; ETHER+ (r = 2) has A = [u; v], C = [-u; v], alpha = 1.
On tokens, `x H = x + alpha p^T A` with `p = C x^T` (r numbers per token and block): two thin matmuls,
4 r FLOPs per feature and token whatever n is. `_ReflectedLinear` is one autograd Function for the whole
layer (input side, frozen GEMM, output side) with a hand-written backward; for a side with incoming
gradient g' it is

    q = C g'^T,    dL/dx = g' + alpha q^T A,    dL/dA (through A and C) = alpha (p g' + q x)

so a side costs a handful of kernels instead of a dozen autograd nodes, and the backward keeps only x, the
thin projections p and, for the output side, its input z = x H W^T (or not even z: `_keep_output_input`).
Layout and route choices (`_Blocks`, `_keep_output_input`, `_thin_input_side`) were made by measurement:
docs/benchmarks.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .base import AdapterLinear

# ETHER+ blocks narrower than this many features run in groups of consecutive blocks, one block-diagonal
# matrix per group: CPU BLAS runs batched matmuls over many 4..20-wide blocks 2-5x slower than over fewer
# groups at least this wide, though these multiply by the zeros off the diagonal, so the reflections' FLOPs
# grow by the group size (measured in docs/benchmarks.md; 1 turns grouping off).
GROUP_WIDTH = 32
_EPS = 1e-12  # as F.normalize
_HALF = (torch.float16, torch.bfloat16)


class _Blocks:
    """The layout of one side: n blocks of k features with r vectors each, as batched matrices.

    ETHER+'s blocks (r = 2) are grouped `group` at a time (see GROUP_WIDTH) into `batch` block-diagonal
    matrices of shape (group*r, group*k); with a single matrix everything is a plain 2-D matmul (fewer,
    cheaper kernels)."""

    def __init__(self, n: int, k: int, r: int):
        self.n, self.k, self.r = n, k, r
        self.group = 1
        if r > 1 and k < GROUP_WIDTH:  # measured: grouping ETHER's single vectors (r = 1) only costs time
            self.group = next(g for g in range(1, n + 1) if n % g == 0 and (g * k >= GROUP_WIDTH or g == n))
        self.batch = n // self.group
        self.mm = torch.mm if self.batch == 1 else torch.bmm
        self.addmm = torch.addmm if self.batch == 1 else torch.baddbmm

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(tokens, n*k) -> (batch, tokens, group*k) without a copy (t itself for a single matrix)."""
        return t if self.batch == 1 else t.view(t.shape[0], self.batch, -1).transpose(0, 1)

    def unit_rows(self, vectors, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The r unit vectors per block as rows, (n, r, k) (or (r, k) for n = 1), in `dtype`; the same in the
        parameters' dtype (float32, or float64 in checks); the norms. Normalised at least in float32 and only
        then cast, so fp16 training does not lose the vector's direction in the norm."""
        if self.n == 1:
            raw = vectors[0] if self.r == 1 else torch.cat(vectors)
        else:
            raw = torch.stack(vectors, 1)
        raw = raw.float() if raw.dtype in _HALF else raw
        norms = torch.linalg.vector_norm(raw, dim=-1, keepdim=True).clamp_min_(_EPS)
        unit = raw / norms
        return (unit if dtype == unit.dtype else unit.to(dtype)), unit, norms

    def vector_grads(self, unit, norms, grad) -> tuple[torch.Tensor, ...]:
        """dL/d(each raw vector) from dL/d(rows), through the normalisation: (g - u (u . g)) / |raw| per row."""
        if self.group > 1:
            grad = grad.view(self.batch, self.group, self.r, self.group, self.k).diagonal(dim1=1, dim2=3)
            grad = grad.permute(0, 3, 1, 2).reshape(self.n, self.r, self.k)
        grad = grad if grad.dtype == unit.dtype else grad.to(unit.dtype)
        grad = torch.addcmul(grad, unit, (unit * grad).sum(-1, keepdim=True), value=-1).div_(norms)
        if self.n == 1:
            return grad.split(1) if self.r > 1 else (grad,)
        return grad.unbind(1)

    def matrices(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows from `unit_rows` -> the (batch, group*r, group*k) block-diagonal matrices (2-D for one)."""
        if self.group == 1:
            return rows
        g = self.group
        grouped = rows.new_zeros(self.batch, g, self.r, g, self.k)
        grouped.diagonal(dim1=1, dim2=3).copy_(rows.view(self.batch, g, self.r, self.k).permute(0, 2, 3, 1))
        grouped = grouped.view(self.batch, g * self.r, g * self.k)
        return grouped[0] if self.batch == 1 else grouped

    def reflect(self, t, p, a, alpha, out=None):
        """`t + alpha p^T A` per block: a new tensor (or `out`), or in place on t when `out is t`."""
        if out is t:  # `out=` rather than addmm_: the same kernel, and FlopCounterMode counts it
            self.addmm(self.view(t), p.mT, a, alpha=alpha, out=self.view(t))
            return t
        if self.batch == 1:
            return torch.addmm(t, p.mT, a, alpha=alpha, out=out)
        out = torch.empty_like(t) if out is None else out
        torch.baddbmm(self.view(t), p.mT, a, alpha=alpha, out=self.view(out))
        return out


def _keep_output_input(n: int, r: int, tokens: int, d_in: int, low_memory: bool) -> bool:
    """Whether the output side's backward keeps its input z = x H W^T (tokens x out) or rebuilds what it
    needs from x: `q~ z_b = (q~ x H) W_b^T` costs 2 n r tokens in FLOPs (one GEMM), a pass over x and one
    over W instead.

    Measured (docs/benchmarks.md): rebuilding is as fast or faster when n r <= 8 and tokens >= 2 in, and
    costs time elsewhere; `low_memory` rebuilds always, for LoRA's activation memory."""
    return not low_memory and (n * r > 8 or tokens < 2 * d_in)


def _thin_input_side(side: "_Blocks", tokens: int, d_in: int) -> bool:
    """Whether, when x needs no gradient, the input side's backward should skip g' = dL/d(x H) (a GEMM of
    2 tokens in out FLOPs) and take the two products it needs through W: 4 n r tokens out FLOPs, plus two
    passes over W (4 r group in out). Chosen when that is at most half the GEMM."""
    return 2 * (4 * side.n * side.r * tokens + 4 * side.r * side.group * d_in) <= 2 * tokens * d_in


class _ReflectedLinear(torch.autograd.Function):
    """`y = ((x H) W^T) H~ + b` with H (and for ETHER+ H~) from the raw vectors; see the module docstring.

    ETHER passes `u` (r = 1) and `sign=None`: C = A and the -2 goes in as `alpha` (no kernel for it). ETHER+
    passes u, v, u~, v~ (r = 2 per side), `sign` = [[-1], [1]] so that C = sign * A, and alpha = 1."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, sign, low_memory, *vectors):
        dtype = x.dtype
        d_out, d_in = weight.shape
        r = 1 if sign is None else 2
        x2 = x.reshape(-1, d_in)
        tokens = x2.shape[0]
        n = vectors[0].shape[0]
        if sign is not None and sign.dtype != dtype:
            sign = sign.to(dtype)
        side_in = _Blocks(n, d_in // n, r)
        a_in, unit_in, norms_in = side_in.unit_rows(vectors[:r], dtype)
        c_in = a_in if sign is None else side_in.matrices(a_in * sign)
        a_in = side_in.matrices(a_in)
        p = side_in.mm(c_in, side_in.view(x2).mT)
        x_h = side_in.reflect(x2, p, a_in, alpha)
        z = p_out = side_out = a_out = c_out = unit_out = norms_out = None
        if len(vectors) == r:  # ETHER: no output side
            y = F.linear(x_h, weight, bias)
        else:
            side_out = _Blocks(n, d_out // n, r)
            a_out, unit_out, norms_out = side_out.unit_rows(vectors[r:], dtype)
            c_out = side_out.matrices(a_out * sign)
            a_out = side_out.matrices(a_out)
            if _keep_output_input(n, r, tokens, d_in, low_memory):
                z = F.linear(x_h, weight)
                p_out = side_out.mm(c_out, side_out.view(z).mT)
                y = z + bias if bias is not None else z.clone()
            else:
                # The bias goes in with the GEMM; the output side must not see it: p~ = C~ (y - b)^T.
                y = F.linear(x_h, weight, bias)
                yb = side_out.view(y)
                if bias is None:
                    p_out = side_out.mm(c_out, yb.mT)
                else:
                    p_out = side_out.addmm(side_out.mm(c_out, side_out.view(bias.view(1, -1)).mT), c_out, yb.mT, beta=-1)
            side_out.reflect(y, p_out, a_out, alpha, out=y)
        ctx.sides, ctx.alpha = (side_in, side_out), alpha
        ctx.save_for_backward(x2, weight, bias, p, a_in, c_in, unit_in, norms_in, z, p_out, a_out, c_out, unit_out, norms_out)
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, weight, bias, p, a_in, c_in, unit_in, norms_in, z, p_out, a_out, c_out, unit_out, norms_out = ctx.saved_tensors
        (side_in, side_out), alpha = ctx.sides, ctx.alpha
        tokens, d_in = x2.shape
        g = grad.reshape(tokens, -1)
        g = g if g.dtype == x2.dtype else g.to(x2.dtype)
        grads_out = ()
        if side_out is not None:  # the output side: grads of its vectors and dL/dz
            gb = side_out.view(g)
            q_out = side_out.mm(c_out, gb.mT)
            g_z = side_out.reflect(g, q_out, a_out, alpha)
            if z is not None:
                da_out = side_out.addmm(side_out.mm(p_out, gb), q_out, side_out.view(z), alpha=alpha, beta=alpha)
            else:
                # q~_b z_b with z = x H W^T is (q~_b (x H)) W_b^T: rebuilt from x instead of kept.
                n, r, m = side_out.n, side_out.r, side_out.k
                qx = q_out.reshape(n * r, tokens) @ side_in.reflect(x2, p, a_in, alpha)  # rows in (block, vector) order
                if n == 1:
                    da_out = torch.addmm(torch.mm(p_out, g), qx, weight.mT)
                else:
                    da_out = side_out.mm(p_out, gb) + side_out.matrices(torch.bmm(qx.view(n, r, d_in), weight.view(n, m, d_in).mT))
                da_out = da_out if alpha == 1 else da_out.mul_(alpha)
            grads_out = side_out.vector_grads(unit_out, norms_out, da_out)
        else:
            g_z = g
        if ctx.needs_input_grad[0] or not _thin_input_side(side_in, tokens, d_in):
            g_x = g_z @ weight  # dL/d(x H)
            gxb = side_in.view(g_x)
            q = side_in.mm(c_in, gxb.mT)
            p_gx = side_in.mm(p, gxb)
        else:
            # x needs no gradient (cross-attention keys/values read frozen text features): the input side needs
            # dL/d(x H) only through C g'^T and p g', so go through W instead of forming g' (a full GEMM).
            w_blocks = weight.view(-1, side_in.batch, d_in // side_in.batch)  # (out, batch, group k)
            q = (side_in.mm(c_in, w_blocks.permute(1, 2, 0).squeeze(0)).reshape(-1, weight.shape[0]) @ g_z.mT).view(p.shape)
            p_gx = side_in.mm((p.reshape(-1, tokens) @ g_z).view(*p.shape[:-1], -1), w_blocks.permute(1, 0, 2).squeeze(0))
        da_in = side_in.addmm(p_gx, q, side_in.view(x2), alpha=alpha, beta=alpha)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = g_z.mT @ side_in.reflect(x2, p, a_in, alpha)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = side_in.reflect(g_x, q, a_in, alpha, out=g_x).view(*grad.shape[:-1], d_in)
        grads_in = side_in.vector_grads(unit_in, norms_in, da_in)
        return grad_x, grad_weight, grad_bias, None, None, None, *grads_in, *grads_out


def reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`x H` for the block-diagonal Householder reflection `H = I - 2 u u^T`, u of shape (n, d/n). No grad."""
    return _side_transform(x, (u,))


def reflect_plus(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`x H+` for the block-diagonal `H+ = I - u u^T + v v^T` (ETHER+), u and v of shape (n, d/n). No grad."""
    return _side_transform(x, (u, v))


@torch.no_grad()
def _side_transform(x, vectors):
    # The forward's input side on its own (for merging): the same layout and kernels.
    n, k = vectors[0].shape
    side = _Blocks(n, k, len(vectors))
    a, _, _ = side.unit_rows(vectors, x.dtype)
    c = a if len(vectors) == 1 else side.matrices(a * torch.tensor([[-1.0], [1.0]], dtype=x.dtype, device=x.device))
    a = side.matrices(a)
    x2 = x.reshape(-1, n * k)
    return side.reflect(x2, side.mm(c, side.view(x2).mT), a, -2.0 if len(vectors) == 1 else 1.0).view(x.shape)


@torch.no_grad()
def block_rows(vectors) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One side as (C, A, alpha) with `x H = x + alpha (x C^T) A`: C and A are (n r, n k), row (i, j) holding
    block i's j-th unit vector in block i's columns (zeros elsewhere), float32. For several adapters in one
    batch (`adapter_batch`), where one batched matmul over these beats a loop over blocks (measured there)."""
    n, k = vectors[0].shape
    r = len(vectors)
    unit = F.normalize(torch.stack(vectors, 1).float(), dim=-1, eps=_EPS)  # (n, r, k)
    a = unit.new_zeros(n, r, n, k)
    a.diagonal(dim1=0, dim2=2).copy_(unit.permute(1, 2, 0))
    a = a.view(n * r, n * k)
    if r == 1:
        return a, a, -2.0
    sign = torch.tensor([-1.0, 1.0], device=a.device).repeat(n)[:, None]  # ETHER+: C = [-u; v] per block
    return a * sign, a, 1.0


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

    `low_memory` (ETHER+ only): keep no more activations for backward than LoRA does (x and thin
    projections), at the time measured in docs/benchmarks.md; `set_low_memory(model)` sets it everywhere.
    """

    def __init__(self, base_layer: nn.Linear, n_blocks: int, plus: bool, generator=None):
        super().__init__(base_layer, n_blocks)
        self.plus = plus
        self.alpha = 1.0 if plus else -2.0  # H = I + alpha C^T A (module docstring)
        self.low_memory = False
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
        # ETHER+'s signs of `H = I - u u^T + v v^T` (module docstring): a buffer, so no tensor is built per call.
        self.register_buffer("ether_sign", torch.tensor([[-1.0], [1.0]], device=dev) if plus else None, persistent=False)

    def vectors(self) -> tuple[torch.Tensor, ...]:
        return (self.ether_u, self.ether_v, self.ether_u_out, self.ether_v_out) if self.plus else (self.ether_u,)

    @property
    def method(self) -> str:
        return "ether+" if self.plus else "ether"

    def forward(self, x):
        w, b = self.base_layer.weight, self.base_layer.bias
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # The Function's kernels run in one dtype; autocast would pick one per kernel in forward and none in
            # backward. So cast once, as autocast would for F.linear, and run without it.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return _ReflectedLinear.apply(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype),
                                              self.alpha, self.ether_sign, self.low_memory, *self.vectors())
        return _ReflectedLinear.apply(x, w, b, self.alpha, self.ether_sign, self.low_memory, *self.vectors())

    def input_transform(self) -> torch.Tensor:
        return block_matrix(self.ether_u, self.ether_v if self.plus else None)

    def output_transform(self) -> torch.Tensor | None:
        return block_matrix(self.ether_u_out, self.ether_v_out) if self.plus else None

    def low_rank_delta(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with `merged_weight() - W = up @ down` (see `low_rank_delta`)."""
        return low_rank_delta(self.base_layer.weight, *self.vectors(), dtype=dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """`W' = H~ W H` through the same O(d) updates as forward: W's rows are reflected on the input
        side (`W H`), then its columns on the output side (`H~ W` = `(W^T H~)^T`)."""
        w = self.base_layer.weight.float()
        if not self.plus:
            return reflect(w, self.ether_u)
        w = reflect_plus(w, self.ether_u, self.ether_v)
        return reflect_plus(w.T.contiguous(), self.ether_u_out, self.ether_v_out).T

    def extra_repr(self):
        return f"n_blocks={self.n_blocks}, plus={self.plus}" + (", low_memory=True" if self.low_memory else "")


def set_low_memory(model: nn.Module, enabled: bool = True) -> int:
    """Switch every ETHER+ layer of `model` to (or from) the low-memory backward; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, ETHERLinear) and m.plus]
    for m in layers:
        m.low_memory = enabled
    return len(layers)


def _reflect_per_sample(x, c, a, alpha):
    """`x H` per sample, `x + alpha (x C^T) A`, C and A (samples, n r, in) block-diagonal (`ether.block_rows`)."""
    return torch.baddbmm(x, torch.bmm(x, c.to(x.dtype).mT), a.to(x.dtype), alpha=alpha)


class PerSampleReflections(nn.Module):
    """Several ETHER (input side) or ETHER+ (both sides) adapters of one layer, one per sample of a batch
    (`adapter_batch`): `y = ((x H) W^T) H~ + b` with each sample's H and H~."""

    def __init__(self, layers):
        super().__init__()
        self.plus = layers[0].plus
        r = 2 if self.plus else 1
        sides = {"in": [layer.vectors()[:r] for layer in layers]}
        if self.plus:
            sides["out"] = [layer.vectors()[r:] for layer in layers]
        for side, vectors in sides.items():
            rows = [block_rows(v) for v in vectors]  # (C, A, alpha) per adapter
            self.alpha = rows[0][2]
            self.register_buffer(f"c_{side}", torch.stack([c for c, _, _ in rows]))
            self.register_buffer(f"a_{side}", torch.stack([a for _, a, _ in rows]))

    def forward(self, x, base, index):
        x = _reflect_per_sample(x, self.c_in[index], self.a_in[index], self.alpha)
        y = F.linear(x, base.weight, base.bias)
        if not self.plus:
            return y
        # The output side must not see the bias: C~ (y - b)^T, with C~ b once per sample rather than y - b.
        c = self.c_out[index].to(y.dtype)
        p = torch.bmm(y, c.mT)
        if base.bias is not None:
            p.sub_((c @ base.bias)[:, None])
        return torch.baddbmm(y, p, self.a_out[index].to(y.dtype), alpha=self.alpha, out=y)

"""Several adapters in one pipeline, one per sample: many subjects (or users) in one batch.

    pipe = load_pipeline("builtin:toy-sd", adapters={"dog": "dog/adapter.safetensors", "cat": "cat/adapter.safetensors"})
    images = generate(pipe, ["a qwe dog", "a qwe cat"], ["dog", "cat"], seeds=[0, 0], num_images_per_prompt=4).images

Every adapted Linear becomes a `MixedAdapterLinear`: the frozen base Linear, shared by the whole batch, and
the K adapters' tensors stacked. A call picks, per sample, which of the K runs on it: ETHER and ETHER+ reflect
each sample's activations with its own vectors (batched matmuls over the samples, O(d) per token), OFT and
Naive multiply them by its own blocks, LoRA adds its own low-rank term, HRA applies its own reflections;
the GEMM with the frozen weight runs once for all. PEFT's `adapter_names=` does this for LoRA only, by a loop
over sub-batches and an argument that diffusers' UNet does not pass down to its layers, so LoRA and HRA get
their per-sample forward here too, computed from PEFT's own parameters.

Which adapter runs on which sample: `AdapterBatch.route(names)` with one name per sample of the pipeline's
batch (prompt-major: prompt i's `num_images_per_prompt` images in a row). Diffusers runs classifier-free
guidance as one UNet batch [unconditional..., conditional...] of twice that size, so a UNet batch that is a
multiple of the route repeats it: each sample's guidance twin goes through the same adapter.

`generate` draws each prompt's initial noise from its own seed exactly as a one-adapter call
`pipe(prompt, num_images_per_prompt=m, generator=torch.Generator("cpu").manual_seed(seed))` draws it, so a
batch gives, sample by sample, the images of one-adapter-at-a-time runs (up to float rounding; for the
deterministic samplers the pipelines use: PNDM, DDIM, DPM-Solver++; a sampler that draws noise in its steps
draws it for the whole batch).
"""
import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_file import config_difference, config_from_metadata, is_adapter_file, load_adapter, read_adapter_metadata
from .adapter_file import read_safetensors_metadata
from .adapters import AdapterConfig, adapter_config_of, base_layer_of, remove_adapters
from .adapters.base import StandsInForLinear
from .adapters.ether import block_rows
from .errors import UserError


class AdapterBatch:
    """The adapters of one UNet by name, and which of them runs on which sample during a call."""

    def __init__(self, names, config):
        self.names = list(names)
        self.config = config  # what every adapter here shares: method, n_blocks or rank, target layers
        self._route = None
        self._index = {}  # (batch size, device) -> per-sample adapter index, built once per call

    @contextlib.contextmanager
    def route(self, names):
        """Run sample i of every UNet call inside the block through adapter `names[i]`."""
        unknown = [name for name in names if name not in self.names]
        if unknown:
            raise UserError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.names)})")
        self._route = torch.tensor([self.names.index(name) for name in names])
        self._index = {}
        try:
            yield
        finally:
            self._route, self._index = None, {}

    def index_for(self, batch_size: int, device) -> torch.Tensor:
        if self._route is None:
            raise RuntimeError("a UNet with several adapters runs inside AdapterBatch.route (adapter_batch.generate)")
        key = (batch_size, str(device))
        if key not in self._index:
            n = len(self._route)
            if batch_size % n:
                raise RuntimeError(f"a batch of {batch_size} samples, but the route names {n}")
            # Classifier-free guidance: [unconditional..., conditional...], each half in the route's order.
            self._index[key] = self._route.repeat(batch_size // n).to(device)
        return self._index[key]


# ---------------------------------------------------------------------------------------------- per-sample forwards
# Each takes the batch as (samples, tokens, in), the base Linear and the per-sample adapter index, and computes
# what each adapter's own layer computes on its samples. Tensors are stacked over the K adapters once, at load,
# and gathered per sample in every call (a few KB for ETHER), so every step is one batched matmul over samples.

def _reflect(x, c, a, alpha, out=None):
    """`x H` per sample, `x + alpha (x C^T) A`, C and A (samples, n r, in) block-diagonal (`ether.block_rows`)."""
    return torch.baddbmm(x, torch.bmm(x, c.to(x.dtype).mT), a.to(x.dtype), alpha=alpha, out=out)


class _Reflections(nn.Module):
    """ETHER (input side) and ETHER+ (both sides): `y = ((x H) W^T) H~ + b` with each sample's H and H~."""

    def __init__(self, layers):
        super().__init__()
        self.plus = layers[0].plus
        r = 2 if self.plus else 1
        for side, vectors in (("in", lambda layer: layer.vectors()[:r]), ("out", lambda layer: layer.vectors()[r:])):
            if side == "out" and not self.plus:
                break
            sides = [block_rows(vectors(layer)) for layer in layers]
            self.alpha = sides[0][2]
            self.register_buffer(f"c_{side}", torch.stack([c for c, _, _ in sides]))
            self.register_buffer(f"a_{side}", torch.stack([a for _, a, _ in sides]))

    def forward(self, x, base, index):
        x = _reflect(x, self.c_in[index], self.a_in[index], self.alpha)
        y = F.linear(x, base.weight, base.bias)
        if not self.plus:
            return y
        # The output side must not see the bias: C~ (y - b)^T, with C~ b once per sample rather than y - b.
        c = self.c_out[index].to(y.dtype)
        p = torch.bmm(y, c.mT)
        if base.bias is not None:
            p.sub_((c @ base.bias)[:, None])
        return torch.baddbmm(y, p, self.a_out[index].to(y.dtype), alpha=self.alpha, out=y)


class _BlockMatrices(nn.Module):
    """OFT and Naive: `y = (x M^T) W^T + b` with each sample's block-diagonal M (as `BlockDiagonalLinear`)."""

    def __init__(self, layers):
        super().__init__()
        self.register_buffer("blocks", torch.stack([layer.block_matrices().detach().float() for layer in layers]))

    def forward(self, x, base, index):
        m = self.blocks[index].to(x.dtype)
        x = torch.einsum("btnj,bnij->btni", x.unflatten(-1, (m.shape[1], -1)), m).flatten(-2)
        return F.linear(x, base.weight, base.bias)


class _LowRank(nn.Module):
    """LoRA (PEFT's layer, adapter "default"): `y = x W^T + b + s (x A^T) B^T` with each sample's A, B, s."""

    def __init__(self, layers):
        super().__init__()
        self.register_buffer("down", torch.stack([layer.lora_A["default"].weight.detach().float() for layer in layers]))
        self.register_buffer("up", torch.stack([layer.lora_B["default"].weight.detach().float() * layer.scaling["default"]
                                                for layer in layers]))

    def forward(self, x, base, index):
        y = F.linear(x, base.weight, base.bias)
        return torch.baddbmm(y, torch.bmm(x, self.down[index].to(x.dtype).mT), self.up[index].to(x.dtype).mT)


class _Householder(nn.Module):
    """HRA (PEFT's layer, adapter "default", without Gram-Schmidt as `methods` configures it): `W' = W R` with
    R = H_0 H_1 ... H_{r-1}, H_i = I - 2 u_i u_i^T (unit u_i), so the input is multiplied by R^T = H_{r-1} ... H_0
    = I + U M U^T, U = [u_0 ... u_{r-1}] and M a small r x r matrix: `x R^T = x + ((x U) M) U^T`, two passes over
    x whatever r is, instead of one per reflection. With more tokens than input features, each sample's
    W R = W + ((W U) M^T) U^T is built instead (what PEFT's layer does, per adapter in the batch) and the GEMM
    runs per sample: the same FLOPs as the shared one, and no pass over x (measured: benchmarks/adapter_batch.py)."""

    def __init__(self, layers):
        super().__init__()
        if any(layer.hra_apply_GS["default"] for layer in layers):
            raise UserError("HRA adapters with Gram-Schmidt (apply_GS) are not supported in one batch")
        rows, cores = [], []
        for layer in layers:
            u = layer.hra_u["default"].detach().double()
            u = u / u.norm(dim=0)  # (in, r), unit columns
            rows.append(u.T.float())
            cores.append(self._core(u).float())
        self.register_buffer("rows", torch.stack(rows))  # (K, r, in)
        self.register_buffer("core", torch.stack(cores))  # (K, r, r)

    @staticmethod
    def _core(u):
        """M, built from I (M = 0) by multiplying I + U M U^T by H_i on the right for i = r-1 down to 0:
        (I + U M U^T)(I - 2 u_i u_i^T) = I + U (M - 2 (e_i + M G e_i) e_i^T) U^T, with G = U^T U."""
        gram, r = u.T @ u, u.shape[1]
        m, eye = torch.zeros(r, r, dtype=u.dtype), torch.eye(r, dtype=u.dtype)
        for i in reversed(range(r)):
            m = m - 2 * torch.outer(eye[i] + m @ gram[:, i], eye[i])
        return m

    def forward(self, x, base, index):
        if x.shape[1] >= base.in_features:
            present, per_sample = index.unique(return_inverse=True)
            u, w = self.rows[present].to(x.dtype), base.weight[None]
            weights = torch.baddbmm(w, torch.bmm(w @ u.mT, self.core[present].to(x.dtype).mT), u)[per_sample]
            y = torch.bmm(x, weights.mT)
            return y if base.bias is None else y.add_(base.bias)
        u = self.rows[index].to(x.dtype)
        x = torch.baddbmm(x, torch.bmm(torch.bmm(x, u.mT), self.core[index].to(x.dtype)), u)
        return F.linear(x, base.weight, base.bias)


PER_SAMPLE = {"ether": _Reflections, "ether+": _Reflections, "oft": _BlockMatrices, "naive": _BlockMatrices,
              "lora": _LowRank, "hra": _Householder}


class MixedAdapterLinear(StandsInForLinear):
    """A frozen Linear with K adapters, one chosen per sample (`AdapterBatch.route`). Inference only."""

    def __init__(self, base_layer: nn.Linear, adapters: nn.Module, batch: AdapterBatch):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = adapters
        self.batch = batch  # a plain object: shared by every layer of the UNet, not a submodule

    def forward(self, x):
        index = self.batch.index_for(x.shape[0], x.device)
        y = self.adapters(x.reshape(x.shape[0], -1, x.shape[-1]), self.base_layer, index)
        return y.view(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------- loading
def adapter_batch_of(unet: nn.Module) -> AdapterBatch | None:
    return getattr(unet, "adapter_batch", None)


def _checked_config(path: Path, first):
    """The adapter file's settings, refused (naming it) when it cannot share a batch with the `first` one."""
    meta = read_safetensors_metadata(path)
    if not is_adapter_file(meta):
        raise UserError(f"{path}: several adapters in one batch must be ether-diffusion adapter files, and this is "
                        "not one (a LoRA file loads alone: adapter=, --adapter PATH)")
    cfg = config_from_metadata(read_adapter_metadata(path), path)
    if first is not None:
        first_path, first_cfg = first
        difference = config_difference(cfg, first_cfg)
        if difference:
            key, got, want = difference
            raise UserError(f"{path}: adapter has {key}={got!r} but {first_path} has {key}={want!r}; adapters in one "
                            "batch share the method, its setting and the target layers")
    return cfg


def check_batchable(paths) -> AdapterConfig:
    """The shared settings of adapter files that can run in one batch; `UserError` names the first that cannot."""
    first = None
    for path in map(Path, paths):
        config = _checked_config(path, first)
        first = first or (path, config)
    return first[1]


@torch.no_grad()
def load_adapters(unet: nn.Module, adapters: dict) -> AdapterBatch:
    """Load the adapter files `{name: path}` into `unet`, each usable per sample (`AdapterBatch.route`).
    Called again, it replaces the adapters it loaded before. Every file is checked against the first (method,
    n_blocks or rank, target layers) and against the model (its layers and their sizes) before it is used."""
    if not adapters:
        raise UserError("no adapters given")
    unload_adapters(unet)
    if adapter_config_of(unet) is not None or getattr(unet, "peft_config", None):
        raise UserError("the UNet already holds an adapter; load several adapters into a fresh pipeline")
    config, per_layer = check_batchable(adapters.values()), {}
    try:
        for path in adapters.values():
            load_adapter(unet, path)  # injects this file's layers and checks every tensor against the model
            for name, layer in remove_adapters(unet):
                per_layer.setdefault(name, []).append(layer)
    except UserError:
        remove_adapters(unet)  # a refused file leaves no adapter layer behind
        raise
    batch = AdapterBatch(adapters, config)
    per_sample = PER_SAMPLE[config.method]
    for name, layers in per_layer.items():
        base = base_layer_of(layers[0])
        unet.set_submodule(name, MixedAdapterLinear(base, per_sample(layers).to(base.weight.device), batch))
    unet.adapter_batch = batch
    return batch


def unload_adapters(unet: nn.Module) -> None:
    """Put the plain Linear layers back (no-op for a UNet without several adapters)."""
    if adapter_batch_of(unet) is None:
        return
    for name, module in list(unet.named_modules()):
        if isinstance(module, MixedAdapterLinear):
            unet.set_submodule(name, module.base_layer)
    del unet.adapter_batch


# ---------------------------------------------------------------------------------------------- sampling
def initial_noise(pipe, seed: int, num_images: int, height: int, width: int) -> torch.Tensor:
    """The latents `pipe(..., num_images_per_prompt=num_images, generator=Generator("cpu").manual_seed(seed))`
    starts from (before the scheduler's `init_noise_sigma`, which the pipeline applies to given latents too)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (num_images, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=pipe._execution_device,
                        dtype=pipe.text_encoder.dtype)


def generate(pipe, prompts, adapter_names, seeds, num_images_per_prompt: int = 1, height=None, width=None, **kwargs):
    """One pipeline call: prompt i through adapter `adapter_names[i]`, its images from `seeds[i]`. Returns the
    pipeline's output (images prompt-major), sample by sample what the adapter alone gives with that seed."""
    batch = adapter_batch_of(pipe.unet)
    if batch is None:
        raise UserError("the pipeline holds no named adapters (load_pipeline(model, adapters={name: path}))")
    if not len(prompts) == len(adapter_names) == len(seeds):
        raise ValueError(f"{len(prompts)} prompts, {len(adapter_names)} adapter names and {len(seeds)} seeds")
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    latents = torch.cat([initial_noise(pipe, seed, num_images_per_prompt, height, width) for seed in seeds])
    with batch.route([name for name in adapter_names for _ in range(num_images_per_prompt)]):
        return pipe(list(prompts), num_images_per_prompt=num_images_per_prompt, height=height, width=width,
                    latents=latents, **kwargs)

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

from .adapter_file import config_difference, config_from_metadata, is_adapter_file, load_adapter, read_adapter_metadata
from .adapter_file import read_safetensors_metadata, text_encoder_config_from_metadata
from .adapters import AdapterConfig, adapter_config_of, base_layer_of, remove_adapters
from .adapters.base import StandsInForLinear
from .adapters.methods import METHODS
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


# Each method's per-sample forward is its entry's `per_sample` (`adapters.methods`): it takes the batch as
# (samples, tokens, in), the base Linear and the per-sample adapter index, and computes what each adapter's own
# layer computes on its samples. Tensors are stacked over the K adapters once, at load, and gathered per sample
# in every call (a few KB for ETHER), so every step is one batched matmul over samples.



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
    meta = read_adapter_metadata(path)
    if text_encoder_config_from_metadata(meta, path) is not None:
        raise UserError(f"{path} holds a text-encoder adapter (--train_text_encoder): adapters in one batch adapt the "
                        "UNet only; load it alone (adapter=, --adapter PATH)")
    cfg = config_from_metadata(meta, path)
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
    per_sample = METHODS[config.method].per_sample
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

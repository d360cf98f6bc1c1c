"""How precisely a LoRA file holds an ETHER+ update: naive factors vs float64-formed, balanced ones.

For SD-1.5's attention shapes, an ETHER+ layer as training leaves it (v = u + a small step, so the two
reflections nearly cancel and the update is small) is exported as (up, down) factors stored in fp16 or bf16:
"naive" casts `ether.low_rank_delta`'s factors as they come, "balanced" is what `ether_diffusion.export`
writes (QR of both factors, SVD of the core). Errors are relative to the exact update W' - W and to W'
(float64), beside the error of storing W' itself in that dtype.

    python benchmarks/export_precision.py
"""
import torch

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion.export import balance

# (name, in, out): SD-1.5 self-attention projections at its three widths and the cross-attention k/v
# projections from the 768-wide text embedding.
SHAPES = [("self 320", 320, 320), ("self 640", 640, 640), ("self 1280", 1280, 1280),
          ("cross 768->320", 768, 320), ("cross 768->1280", 768, 1280)]
STEPS = (0.01, 0.1)  # |v - u| / |u| after training, per vector
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def etherplus_layer(d_in, d_out, n, step, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5)  # SD-like scale
    inject_adapters(model, AdapterConfig(method="ether+", n_blocks=n, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        for v in (layer.ether_v, layer.ether_v_out):
            v.add_(step * v.norm(dim=-1, keepdim=True) * torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5)
    return layer


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    torch.set_num_threads(1)
    print("| layer | n | step | dtype | naive / update | balanced / update | naive / W' | balanced / W' | W' stored / W' |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, d_in, d_out in SHAPES:
        for n in (1, 4):
            for step in STEPS:
                layer = etherplus_layer(d_in, d_out, n, step)
                up, down = layer.low_rank_delta(torch.float64)
                w = layer.base_layer.weight.double()
                update = up @ down
                merged = w + update
                balanced = balance(up, down, 4 * n)
                for label, dtype in DTYPES.items():
                    def stored(factors):
                        return factors[0].to(dtype).double() @ factors[1].to(dtype).double()

                    naive, good = stored((up, down)), stored(balanced)
                    print(f"| {name} | {n} | {step} | {label} | {relative(naive, update):.1e} | {relative(good, update):.1e} "
                          f"| {relative(w + naive, merged):.1e} | {relative(w + good, merged):.1e} "
                          f"| {relative(merged.to(dtype).double(), merged):.1e} |")


if __name__ == "__main__":
    main()

"""Training-step time and peak memory of each adapter on the real SD-1.5 UNet (random weights), 512 px.

Run by benchmarks/gpu_check.sh on a GPU machine; on CPU with `--device cpu --unet tiny --resolution 32
--steps 2` it exercises the same code path in seconds. Each row: a fresh UNet in the given dtype (frozen),
the adapter injected (float32 parameters, as the trainer does), AdamW, autocast in that dtype (a GradScaler
for fp16), batch 1, random latents and text embeddings; median time of the timed steps after warm-up, and
`torch.cuda.max_memory_allocated` over the whole step (weights included).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ether_diffusion import AdapterConfig, analysis, inject_adapters
from ether_diffusion.adapters import adapter_parameters
from ether_diffusion.builtin import resolve_model_path
from ether_diffusion.tiny_sd import build_sd15_unet

# (label, method, n_blocks, dense H?): ETHER/ETHER+ at n = 1, 4, 32, LoRA r=4 and OFT n=4 as in
# adapter_overhead.py, plus the paper-code (dense H) ETHER+ for contrast
CONFIGS = [
    ("ETHER n=1", "ether", 1, False), ("ETHER n=4", "ether", 4, False), ("ETHER n=32", "ether", 32, False),
    ("ETHER+ n=1", "ether+", 1, False), ("ETHER+ n=4", "ether+", 4, False), ("ETHER+ n=32", "ether+", 32, False),
    ("ETHER+ n=1 (dense H, paper code)", "ether+", 1, True),
    ("LoRA r=4", "lora", 1, False), ("OFT n=4", "oft", 4, False),
]
VAE_FACTOR = {"sd15": 8, "tiny": 4}  # pixels per latent: SD's VAE downsamples 8x, the tiny SD's 4x
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_unet(kind: str, device, dtype):
    from diffusers import UNet2DConditionModel

    if kind == "sd15":
        unet = build_sd15_unet(device)  # random init straight on the device: no 3.4 GB on the host
    else:
        unet = UNet2DConditionModel.from_pretrained(resolve_model_path("builtin:tiny-sd"), subfolder="unet")
    return unet.to(device, dtype).requires_grad_(False)


def measure(args, label, method, n, dense, dtype_name) -> dict:
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    unet = build_unet(args.unet, device, dtype)
    inject_adapters(unet, AdapterConfig(method=method, n_blocks=n, rank=4))
    if dense:
        analysis.use_dense_h(unet)
    unet.train()
    params = adapter_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    latent = args.resolution // VAE_FACTOR[args.unet]
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    noise = torch.randn(latents.shape, generator=g).to(device, dtype)

    def step():
        t = torch.randint(0, 1000, (1,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents, t, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = {"config": label, "dtype": dtype_name, "ms_per_step": 1000 * statistics.median(times),
           "peak_gib": peak, "trainable": sum(p.numel() for p in params)}
    del unet, optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows, header: str) -> str:
    lines = [header, "", "| config | dtype | ms / step (median) | peak memory GiB | trainable params |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['dtype']} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | {r['trainable']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--unet", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None, help="Also write the table here (and the rows as .json beside it).")
    args = p.parse_args(argv)

    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        name = "cpu"
    header = (f"Training step, {args.unet} UNet (random weights), {args.resolution} px, batch 1, adapters on "
              f"to_q/to_k/to_v/to_out.0; device {name}, torch {torch.__version__}; median of {args.steps} steps "
              f"after {args.warmup} warm-up.")
    print(header, flush=True)
    rows = []
    for dtype_name in args.dtypes.split(","):
        for label, method, n, dense in CONFIGS:
            rows.append(measure(args, label, method, n, dense, dtype_name))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

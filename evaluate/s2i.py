#!/usr/bin/env python
"""S2I evaluation: generate from the ADE20K validation maps with a trained control encoder + adapter, then
score semantic fidelity (mIoU, pixel accuracy with a UperNet) and image quality (FID).

    accelerate launch --num_processes 8 -m evaluate.s2i \
        --dataset data/ADEChallengeData2016 --caption_file data/ade20k_captions.jsonl \
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --control_dir runs/s2i_ether_plus \
        --output_dir eval/s2i_ether_plus

Each validation pair (2000 in the real set; `--limit` for fewer) is resized and centre-cropped to
`--resolution` exactly as in training (`ether_diffusion.ade20k.ADE20KDataset`); one image is generated per
map into `OUT/images/<name>.png`, split across processes, and a rerun skips images that exist. Each image's
seed depends only on its file name. The main process then segments the generated images and compares them
with the cropped label maps (150 classes, label 0 ignored, accuracy over labelled pixels; summed over the
whole set, mmsegmentation's definitions), computes FID against the cropped real images at the same
resolution, and writes `metrics.json`, `per_image.csv`, `summary.md` and `grids/` (map | generated | real).
The segmenter is also run on the real images: its score there is the ceiling the generated images can reach.
A run trained on ControlNet-style data (`control_encoder.json` says `"conditioning": "image"`) is refused: its
encoder reads conditioning pictures, not ADE20K maps, so the segmenter's scores would not apply.
"""
import csv
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from tqdm.auto import tqdm

from ether_diffusion import checks
from ether_diffusion.ade20k import ADE20KDataset
from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.control import ADE20K_CONDITIONING, ENCODER_CONFIG, ENCODER_WEIGHTS, S2IPipeline, control_conditioning
from ether_diffusion.devices import TORCH_DTYPES
from ether_diffusion.errors import ArgumentParser, UserError, run_cli
from ether_diffusion.files import load_rgb, save_image, write_text
from ether_diffusion.grids import image_grid, save_grid
from evaluate import harness
from evaluate.harness import fmt
from evaluate.metrics import (DEFAULT_INCEPTION, DEFAULT_SEGMENTER, SegmentationScores, UperNetSegmenter, is_all_black,
                              make_fid)
from evaluate.paper_tables import PAPER, TABLE_3

GRID_ROWS = 8


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="ADEChallengeData2016 folder (or its parent)")
    parser.add_argument("--caption_file", default=None, help="metadata.jsonl captions; default: class-name captions")
    parser.add_argument("--conditioning_is_rgb", action="store_true", help="annotations are palette-coloured maps")
    harness.add_common_args(parser)
    parser.add_argument("--control_dir", default=None,
                        help="S2I training output folder or checkpoint (control_encoder.* and, unless encoder-only, adapter.safetensors)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N validation pairs (default: all)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4, help="maps per pipeline call")
    parser.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="UperNet hub id or local folder (150 ADE20K classes)")
    parser.add_argument("--inception", default=DEFAULT_INCEPTION,
                        help="FID features: inception-v3-compat, a torch-fidelity weights file, or a local stand-in folder")
    args = harness.parse_args(parser, argv)
    checks.at_least(args, 1, "limit", "batch_size")
    if not args.skip_generation and (args.pretrained_model_name_or_path is None or args.control_dir is None):
        raise UserError("--pretrained_model_name_or_path and --control_dir are needed to generate "
                        "(or pass --skip_generation to score existing images)")
    if args.control_dir is not None and control_conditioning(args.control_dir) != ADE20K_CONDITIONING:
        # its encoder reads conditioning pictures, not ADE20K maps: the segmenter's scores would mean nothing
        raise UserError(f"--control_dir {args.control_dir} was trained on ControlNet-style data, not ADE20K label maps: "
                        "mIoU and accuracy do not apply; sample it with S2IPipeline.from_output and its own images")
    return args


# ---------------------------------------------------------------------------------------------- data
def load_dataset(args):
    return ADE20KDataset(args.dataset, split="validation", resolution=args.resolution, caption_file=args.caption_file,
                         conditioning_is_rgb=args.conditioning_is_rgb, max_samples=args.limit, center_crop=True)


def name_of(dataset, index) -> str:
    return dataset.pairs[index][0].stem


def generated_path(args, dataset, index) -> Path:
    return Path(args.output_dir) / "images" / f"{name_of(dataset, index)}.png"


def generation_settings(args, dataset) -> dict:
    """What makes the images (`harness.start_generation`; an image is its map's, by name): the control folder's
    files and the dataset's caption file by their hashes (None where not given: --skip_generation)."""
    control = (harness.files_sha256(Path(args.control_dir, name) for name in (ENCODER_WEIGHTS, ENCODER_CONFIG, ADAPTER_FILE))
               if args.control_dir else None)
    captions = harness.files_sha256([dataset.caption_file]) if dataset.caption_file else None
    return {"model": harness.same_path(args.pretrained_model_name_or_path), "control_sha256": control,
            "dataset": harness.same_path(args.dataset), "caption_sha256": captions,
            "conditioning_is_rgb": args.conditioning_is_rgb, "seed": args.seed,
            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "resolution": args.resolution, "mixed_precision": args.mixed_precision}


def to_uint8(item_pixels: torch.Tensor) -> torch.Tensor:
    """Dataset pixel values in [-1, 1] -> uint8 (3, H, W), what FID is fed."""
    return ((item_pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------- generation
def generate(args, dataset, accelerator):
    names = {name_of(dataset, i): i for i in range(len(dataset))}
    harness.start_generation(accelerator, args.output_dir, generation_settings(args, dataset),
                             lambda: {name: {"map": str(dataset.pairs[i][1].name)} for name, i in names.items()},
                             lambda name: [generated_path(args, dataset, names[name])])
    my_indices = harness.my_share(accelerator, range(len(dataset)),
                                  lambda i: generated_path(args, dataset, i).is_file(), "images")
    if not my_indices:
        return 0

    pipe = S2IPipeline.from_output(args.pretrained_model_name_or_path, args.control_dir, device=accelerator.device,
                                   torch_dtype=TORCH_DTYPES[args.mixed_precision])
    (Path(args.output_dir) / "images").mkdir(parents=True, exist_ok=True)
    batches = [my_indices[i:i + args.batch_size] for i in range(0, len(my_indices), args.batch_size)]
    progress = tqdm(total=len(my_indices), desc=f"maps (process {accelerator.process_index})",
                    disable=not accelerator.is_local_main_process)
    for batch in batches:
        items = [dataset[i] for i in batch]
        maps = [TF.to_pil_image(item["conditioning_pixel_values"]) for item in items]
        generators = [torch.Generator("cpu").manual_seed(harness.item_seed(args.seed, name_of(dataset, i))) for i in batch]
        images = pipe([item["caption"] for item in items], maps, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, generator=generators,
                      height=args.resolution, width=args.resolution)
        for index, image in zip(batch, images):
            save_image(image, generated_path(args, dataset, index))  # complete or absent: never half done
        progress.update(len(batch))
    progress.close()
    return len(my_indices)


# ---------------------------------------------------------------------------------------------- metrics
def score(args, dataset, device):
    for index in range(len(dataset)):  # before loading any backbone
        if not generated_path(args, dataset, index).is_file():
            raise UserError(f"{generated_path(args, dataset, index)} does not exist: generation is incomplete "
                            f"(rerun without --skip_generation)")
    segmenter = UperNetSegmenter(args.segmenter, device)
    fid = make_fid(args.inception, device)
    generated_scores, real_scores = SegmentationScores(), SegmentationScores()
    rows, black = [], 0
    for start in range(0, len(dataset), args.batch_size):
        indices = list(range(start, min(start + args.batch_size, len(dataset))))
        items = [dataset[i] for i in indices]
        paths = [generated_path(args, dataset, i) for i in indices]
        generated = [load_rgb(p) for p in paths]
        for path, image in zip(paths, generated):
            if image.size != (args.resolution, args.resolution):
                raise UserError(f"{path}: image is {image.width}x{image.height}, expected {args.resolution} px "
                                f"(generated with another --resolution?)")
        real = [TF.to_pil_image(to_uint8(item["pixel_values"])) for item in items]
        kept = [k for k, image in enumerate(generated) if not is_all_black(image)]
        black += len(indices) - len(kept)

        fid.update(torch.stack([to_uint8(item["pixel_values"]) for item in items]).to(device), real=True)
        if kept:
            fid.update(torch.stack([TF.pil_to_tensor(generated[k]) for k in kept]).to(device), real=False)
        predicted = segmenter([generated[k] for k in kept])
        predicted_real = segmenter(real)
        for k, item in enumerate(items):
            labels = item["labels"].numpy()
            real_scores.update(predicted_real[k], labels)
            row = {"name": name_of(dataset, indices[k]), "caption": item["caption"], "black": int(k not in kept)}
            if k in kept:
                prediction = predicted[kept.index(k)]
                generated_scores.update(prediction, labels)
                one = SegmentationScores()
                one.update(prediction, labels)
                row.update({key: one.compute()[key] for key in ("miou", "accuracy")})
            rows.append(row)

    scored = len(dataset) - black
    metrics = {key: generated_scores.compute()[key] for key in ("miou", "accuracy")}
    metrics["fid"] = float(fid.compute()) if scored >= 2 else float("nan")
    metrics.update({f"real_{key}": real_scores.compute()[key] for key in ("miou", "accuracy")})
    unlabelled = "the label maps have no labelled pixels (all 0)"
    segmented = f"all {len(dataset)} generated images are all-black, so none was segmented" if not scored else unlabelled
    reasons = {"miou": segmented, "accuracy": segmented, "real_miou": unlabelled, "real_accuracy": unlabelled,
               "fid": f"{scored} generated image(s) are not all-black: FID needs at least 2"}
    return *harness.without_nan(metrics, reasons), rows, black


# ---------------------------------------------------------------------------------------------- reports
def write_reports(args, dataset, metrics, not_computed, rows, black):
    output_dir = Path(args.output_dir)
    with open(output_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "caption", "black", "miou", "accuracy"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "miou": fmt(row.get("miou")), "accuracy": fmt(row.get("accuracy"))})

    settings = {k: getattr(args, k) for k in ("dataset", "caption_file", "pretrained_model_name_or_path", "control_dir",
                                              "limit", "resolution", "seed", "num_inference_steps", "guidance_scale",
                                              "segmenter", "inception")}
    report = {"metrics": metrics, "not_computed": not_computed, "images": len(dataset), "black_skipped": black,
              "settings": settings,
              "definitions": "mIoU/accuracy summed over all images (label 0 ignored, 150 classes); FID vs the "
                             "cropped real validation images at the same resolution; real_* = segmenter on real images"}
    harness.write_json(output_dir / "metrics.json", report)

    rows_md = ["| method | #params | mIoU (%) | Acc (%) | FID |", "|---|---|---|---|---|"]
    rows_md += [f"| {m} (paper Table 3) | {p} | {miou:.1f} | {acc:.1f} | {fid:.1f} |" for m, p, miou, acc, fid in TABLE_3]
    name = Path(args.control_dir or args.output_dir).name
    rows_md.append(f"| ours: {name} | | {fmt(metrics['miou'], 100, 2)} | {fmt(metrics['accuracy'], 100, 2)} "
                   f"| {fmt(metrics['fid'], 1, 2)} |")
    rows_md.append(f"| real images (segmenter ceiling) | | {fmt(metrics['real_miou'], 100, 2)} "
                   f"| {fmt(metrics['real_accuracy'], 100, 2)} | |")
    summary = [
        "# S2I evaluation (ADE20K validation)", "",
        f"{len(dataset)} maps at {args.resolution} px ({black} all-black generated images skipped).", "",
        *rows_md, "",
        "mIoU and pixel accuracy are summed over the whole set (150 classes, label 0 ignored, accuracy over "
        "labelled pixels); FID compares with the real validation images cropped the same way.",
        f"Segmenter `{args.segmenter}`; FID features `{args.inception}`.",
        f"Paper rows: {PAPER}, measured with UperNet-101 on SD-1.5; comparable only when run the same way.",
        *(f"Not computed: {name}: {why}." for name, why in not_computed.items()), "",
        "Per image: `per_image.csv`; grids (map | generated | real): `grids/`.", "",
    ]
    write_text(output_dir / "summary.md", "\n".join(summary))
    return report


def write_grids(args, dataset, count=4 * GRID_ROWS):
    """Grids of GRID_ROWS rows, each row map | generated | real, for the first `count` maps."""
    grid_dir = Path(args.output_dir) / "grids"
    grid_dir.mkdir(exist_ok=True)
    indices = list(range(min(count, len(dataset))))
    for number, start in enumerate(range(0, len(indices), GRID_ROWS)):
        cells = []
        for i in indices[start:start + GRID_ROWS]:
            item = dataset[i]
            cells += [TF.to_pil_image(item["conditioning_pixel_values"]), load_rgb(generated_path(args, dataset, i)),
                      TF.to_pil_image(to_uint8(item["pixel_values"]))]
        save_grid(image_grid(cells, cols=3), grid_dir / f"grid_{number:02d}.png")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    dataset = load_dataset(args)
    if args.skip_generation:
        harness.check_generated(args.output_dir, generation_settings(args, dataset))

    def report(device):
        metrics, not_computed, rows, black = score(args, dataset, device)
        result = write_reports(args, dataset, metrics, not_computed, rows, black)
        write_grids(args, dataset)
        return result

    return harness.run(args, lambda accelerator: generate(args, dataset, accelerator), report)


if __name__ == "__main__":
    run_cli(main)

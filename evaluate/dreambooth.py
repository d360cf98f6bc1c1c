#!/usr/bin/env python
"""DreamBooth evaluation: generate the protocol's images with trained adapters, then score them.

    accelerate launch --num_processes 8 -m evaluate.dreambooth \
        --dataset data/dreambooth --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --adapters runs/ether_plus --output_dir eval/ether_plus

Jobs are the (subject, prompt) pairs of the protocol (30 x 25 = 750). They are split across processes;
images land in `OUT/<subject>/<prompt_idx>/NN.png` and a rerun skips the jobs whose images all exist.
Each job's seed depends only on the job, so splits and resumed runs draw the same images.
`--subjects_per_batch K` denoises the jobs of K subjects in one batch, each sample through its own adapter
(`ether_diffusion.adapter_batch`): the same images (up to float rounding), in fewer calls.
Once every process is done, the main process scores all images (DINO, CLIP-I, CLIP-T, LPIPS real-vs-generated
and LPIPS diversity within a prompt; all-black images are skipped and counted) and writes
`metrics.json`, `per_subject.csv`, `per_prompt.csv`, `summary.md` and `grids/<subject>.png`.

Averaging follows the OFT evaluation code the paper reused: DINO, CLIP-I and LPIPS average over every
(real photo, generated image) pair, CLIP-T over generated images, all pooled over subjects. LPIPS diversity
averages over the pairs of images generated for the same prompt.
"""
import csv
import itertools
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ether_diffusion import adapter_batch, checks
from ether_diffusion.adapter_file import check_adapter_or_lora
from ether_diffusion.devices import TORCH_DTYPES
from ether_diffusion.errors import ArgumentParser, UserError, run_cli
from ether_diffusion.export import file_sha256
from ether_diffusion.files import load_rgb, save_image, write_text
from ether_diffusion.grids import image_grid, save_grid
from ether_diffusion.pipelines import apply_adapter, load_pipeline
from evaluate import harness
from evaluate.harness import fmt
from evaluate.metrics import (DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_LPIPS, ClipEmbedder, DinoEmbedder, LpipsDistance,
                              cosine_matrix, is_all_black)
from evaluate.paper_tables import PAPER, TABLE_2
from evaluate.protocol import ADAPTER_FILE, adapters_from_dir, adapters_from_manifest, load_protocol

METRICS = ("dino", "clip_i", "clip_t", "lpips", "lpips_diversity")
GENERATION_LOG = "generation_log.jsonl"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="DreamBooth dataset folder (<subject>/*.jpg + prompts_and_classes.txt)")
    harness.add_common_args(parser)
    adapters = parser.add_mutually_exclusive_group()
    adapters.add_argument("--adapters", help="folder with one adapter per subject: DIR/<subject>/adapter.safetensors")
    adapters.add_argument("--manifest", help="CSV with columns subject,prompt_index,adapter (one adapter per job)")
    parser.add_argument("--adapter_file", default=ADAPTER_FILE,
                        help="the file name in each --adapters subject folder: an adapter file, or a LoRA exported from "
                             "it (e.g. lora_kohya.safetensors, written by the trainers' --export_lora kohya)")
    parser.add_argument("--token", default="qwe", help="the identifier used in training")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own (512 for SD-1.5)")
    parser.add_argument("--subjects_per_batch", type=int, default=1,
                        help="generate the jobs of this many adapters (subjects) in one batch, each sample through its "
                             "own adapter (ether_diffusion.adapter_batch): the same images, fewer, larger batches; "
                             "needs adapter files of one method and setting")
    parser.add_argument("--subjects", default=None, help="comma-separated subset of subjects (default: all)")
    parser.add_argument("--prompts", default=None, help="comma-separated subset of prompt indices (default: all 25)")
    parser.add_argument("--dino", default=DEFAULT_DINO, help="ViT hub id or local folder")
    parser.add_argument("--clip", default=DEFAULT_CLIP, help="open_clip MODEL:PRETRAINED, hf-hub:ORG/REPO or local folder")
    parser.add_argument("--lpips_net", default=DEFAULT_LPIPS, help="vgg|alex|squeeze or a local LPIPS folder")
    parser.add_argument("--lpips_resolution", type=int, default=512, help="images are resized to this square size for LPIPS")
    parser.add_argument("--clip_t_with_token", action="store_true",
                        help="score CLIP-T against the prompt with the identifier (default: without it)")
    args = harness.parse_args(parser, argv)
    checks.at_least(args, 1, "images_per_prompt", "subjects_per_batch")
    checks.at_least(args, 32, "lpips_resolution")  # the smallest input LPIPS' AlexNet trunk accepts
    if not args.skip_generation:
        if args.pretrained_model_name_or_path is None:
            raise UserError("--pretrained_model_name_or_path is required to generate (or pass --skip_generation)")
        if args.adapters is None and args.manifest is None:
            raise UserError("pass --adapters DIR or --manifest CSV (or --skip_generation to score existing images)")
    if args.subjects is not None:
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
        if not subjects:
            raise UserError(f"--subjects {args.subjects!r} names no subject")
        args.subjects = subjects
    if args.prompts is not None:
        try:
            prompts = [int(p) for p in args.prompts.split(",") if p.strip()]
        except ValueError:
            raise UserError(f"--prompts {args.prompts!r}: expected comma-separated integers") from None
        if not prompts:
            raise UserError(f"--prompts {args.prompts!r} names no prompt index")
        args.prompts = prompts
    return args


# ---------------------------------------------------------------------------------------------- files
def image_paths(output_dir: Path, job, count: int) -> list[Path]:
    return [output_dir / job.subject / str(job.prompt_index) / f"{i:02d}.png" for i in range(count)]


def is_done(output_dir: Path, job, count: int) -> bool:
    return all(p.is_file() for p in image_paths(output_dir, job, count))


def generation_settings(args) -> dict:
    """What makes every job's images, besides its adapter and prompt (`harness.start_generation`)."""
    return {"model": harness.same_path(args.pretrained_model_name_or_path), "images_per_prompt": args.images_per_prompt,
            "seed": args.seed, "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "resolution": args.resolution, "mixed_precision": args.mixed_precision}


def fingerprints(args, jobs, adapters) -> dict:
    """{job key: the hash of its adapter file and its prompt}: what makes one job's images its own."""
    hashes = {adapter: file_sha256(adapter) for adapter in set(adapters.values())}
    return {job.key: {"adapter_sha256": hashes[adapters[(job.subject, job.prompt_index)]], "prompt": job.prompt(args.token)}
            for job in jobs}


# ---------------------------------------------------------------------------------------------- generation
def generate(args, jobs, adapters, accelerator):
    """Generate the jobs not done yet, split across processes. Returns how many this process generated.
    Batches hold the jobs of `--subjects_per_batch` adapters, one job of each."""
    output_dir = Path(args.output_dir)
    by_key = {job.key: job for job in jobs}
    harness.start_generation(accelerator, output_dir, generation_settings(args), lambda: fingerprints(args, jobs, adapters),
                             lambda key: image_paths(output_dir, by_key[key], args.images_per_prompt))
    # Jobs sharing an adapter stay together, so each process loads each adapter once.
    jobs = sorted(jobs, key=lambda job: (str(adapters[(job.subject, job.prompt_index)]), job.subject, job.prompt_index))
    my_jobs = harness.my_share(accelerator, jobs, lambda job: is_done(output_dir, job, args.images_per_prompt), "jobs")
    if not my_jobs:
        return 0

    pipe = load_pipeline(args.pretrained_model_name_or_path, device=accelerator.device,
                         torch_dtype=TORCH_DTYPES[args.mixed_precision])
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = dict(num_images_per_prompt=args.images_per_prompt, height=size, width=size,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    plan = [(group, batch) for group in adapter_groups(my_jobs, adapters, args.subjects_per_batch)
            for batch in batches_of(group, my_jobs, adapters)]
    loaded = None
    for group, batch in tqdm(plan, desc=f"batches (process {accelerator.process_index})",
                             disable=not accelerator.is_local_main_process):
        if group is not loaded:
            if args.subjects_per_batch == 1:
                # An adapter file of the same method and layers reuses the wrappers; a LoRA file replaces the last one.
                apply_adapter(pipe, group[0])
            else:
                adapter_batch.load_adapters(pipe.unet, {str(adapter): adapter for adapter in group})
            loaded = group
        seeds = [harness.item_seed(args.seed, job.key) for job in batch]
        if args.subjects_per_batch == 1:
            images = pipe(batch[0].prompt(args.token), generator=torch.Generator("cpu").manual_seed(seeds[0]),
                          **settings).images
        else:
            names = [str(adapters[(job.subject, job.prompt_index)]) for job in batch]
            images = adapter_batch.generate(pipe, [job.prompt(args.token) for job in batch], names, seeds, **settings).images
        for i, (job, seed) in enumerate(zip(batch, seeds)):
            save_job(args, job, images[i * args.images_per_prompt:(i + 1) * args.images_per_prompt], seed,
                     adapters[(job.subject, job.prompt_index)], accelerator.process_index)
    return len(my_jobs)


def adapter_groups(jobs, adapters, size: int) -> list[list]:
    """The jobs' adapters in order of first use, `size` at a time: the adapters loaded together."""
    used = list(dict.fromkeys(adapters[(job.subject, job.prompt_index)] for job in jobs))
    return [used[i:i + size] for i in range(0, len(used), size)]


def batches_of(group, jobs, adapters) -> list[list]:
    """The jobs of a group of adapters as batches of jobs with different adapters: the i-th job of each."""
    per_adapter = [[job for job in jobs if adapters[(job.subject, job.prompt_index)] == adapter] for adapter in group]
    return [[job for job in row if job is not None] for row in itertools.zip_longest(*per_adapter)]


def save_job(args, job, images, seed, adapter, process):
    for image, path in zip(images, image_paths(Path(args.output_dir), job, args.images_per_prompt)):
        save_image(image, path)  # complete or absent: a partial PNG never counts as done
    # One short line per job, appended (atomic for small writes): which process, seed and adapter made it.
    with open(Path(args.output_dir) / GENERATION_LOG, "a") as f:
        f.write(json.dumps({"subject": job.subject, "prompt_index": job.prompt_index, "seed": seed,
                            "adapter": str(adapter), "process": process}) + "\n")


# ---------------------------------------------------------------------------------------------- metrics
class Tally:
    """Sums and counts per metric, so means can be pooled at any level (prompt, subject, all)."""

    def __init__(self):
        self.sums = dict.fromkeys(METRICS, 0.0)
        self.counts = dict.fromkeys(METRICS, 0)
        self.images = self.black = 0

    def add(self, metric, values: torch.Tensor):
        self.sums[metric] += float(values.double().sum())
        self.counts[metric] += values.numel()

    def merge(self, other):
        for m in METRICS:
            self.sums[m] += other.sums[m]
            self.counts[m] += other.counts[m]
        self.images += other.images
        self.black += other.black

    def means(self) -> dict:
        return {m: (self.sums[m] / self.counts[m] if self.counts[m] else float("nan")) for m in METRICS}


def score(args, protocol, jobs, real_images, device):
    """Per-job tallies {(subject, prompt_index): Tally}."""
    output_dir = Path(args.output_dir)
    for job in jobs:  # before loading any backbone
        missing = [p for p in image_paths(output_dir, job, args.images_per_prompt) if not p.is_file()]
        if missing:
            raise UserError(f"{missing[0]} does not exist: generation is incomplete for {job.subject} prompt "
                            f"{job.prompt_index} (rerun without --skip_generation)")
    dino = DinoEmbedder(args.dino, device)
    clip = ClipEmbedder(args.clip, device)
    lpips = LpipsDistance(args.lpips_net, device, resolution=args.lpips_resolution)

    tallies = {}
    for subject in dict.fromkeys(job.subject for job in jobs):
        real = real_images[subject]
        real_dino, real_clip, real_lpips = dino.images(real), clip.images(real), lpips.prepare(real)
        subject_jobs = [job for job in jobs if job.subject == subject]
        texts = clip.texts([job.prompt(args.token if args.clip_t_with_token else None) for job in subject_jobs])
        for job, text in zip(subject_jobs, texts):
            tally = Tally()
            images = [load_rgb(p) for p in image_paths(output_dir, job, args.images_per_prompt)]
            tally.images = len(images)
            images = [im for im in images if not is_all_black(im)]
            tally.black = tally.images - len(images)
            if images:
                tally.add("dino", cosine_matrix(real_dino, dino.images(images)).flatten())
                generated_clip = clip.images(images)
                tally.add("clip_i", cosine_matrix(real_clip, generated_clip).flatten())
                tally.add("clip_t", cosine_matrix(generated_clip, text[None]).flatten())
                generated = lpips.prepare(images)
                tally.add("lpips", lpips.pairs(real_lpips, generated, [(r, g) for r in range(len(real)) for g in range(len(images))]))
                tally.add("lpips_diversity", lpips.pairs(generated, generated,
                                                         [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]))
            tallies[(job.subject, job.prompt_index)] = tally
    return tallies


# ---------------------------------------------------------------------------------------------- reports
def write_reports(args, protocol, jobs, tallies):
    output_dir = Path(args.output_dir)
    total, per_subject = Tally(), {}
    for job in jobs:
        per_subject.setdefault(job.subject, Tally()).merge(tallies[(job.subject, job.prompt_index)])
        total.merge(tallies[(job.subject, job.prompt_index)])
    if total.black == total.images:
        reasons = dict.fromkeys(METRICS, f"all {total.images} generated images are all-black, so none was scored")
    else:
        reasons = {"lpips_diversity": "no prompt has two scored images to compare (one image per prompt, or the "
                                      "others all-black)"}
    means, not_computed = harness.without_nan(total.means(), reasons)

    with open(output_dir / "per_prompt.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "prompt_index", "prompt", "images", "black_skipped", *METRICS])
        for job in jobs:
            t = tallies[(job.subject, job.prompt_index)]
            writer.writerow([job.subject, job.prompt_index, job.prompt(args.token), t.images, t.black,
                             *(fmt(v) for v in t.means().values())])
    with open(output_dir / "per_subject.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "class", "live", "images", "black_skipped", *METRICS])
        for name, t in per_subject.items():
            s = protocol.subjects[name]
            writer.writerow([name, s.class_name, int(s.live), t.images, t.black, *(fmt(v) for v in t.means().values())])

    settings = {k: getattr(args, k) for k in ("dataset", "pretrained_model_name_or_path", "adapters", "adapter_file", "manifest", "token",
                                              "images_per_prompt", "seed", "num_inference_steps", "guidance_scale",
                                              "resolution", "dino", "clip", "lpips_net", "lpips_resolution",
                                              "clip_t_with_token", "subjects", "prompts")}
    report = {
        "metrics": means,
        "not_computed": not_computed,  # {metric: why it is null}
        "averaging": "DINO, CLIP-I, LPIPS: mean over (real, generated) pairs; CLIP-T: over generated images; "
                     "lpips_diversity: over pairs of images of the same prompt; all pooled over subjects",
        "jobs": len(jobs), "subjects": len(per_subject),
        "images": total.images, "black_skipped": total.black,
        "settings": settings,
    }
    harness.write_json(output_dir / "metrics.json", report)

    rows = ["| method | #params | DINO | CLIP-I | CLIP-T | LPIPS | LPIPS diversity |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {m} (paper Table 2) | {p or ''} | {fmt(d, digits=3)} | {fmt(ci, digits=3)} | {fmt(ct, digits=3)} "
             f"| {fmt(lp, digits=3)} | |" for m, p, d, ci, ct, lp in TABLE_2]
    name = Path(args.adapters or args.manifest or args.output_dir).name
    rows.append(f"| ours: {name} | | {fmt(means['dino'])} | {fmt(means['clip_i'])} | {fmt(means['clip_t'])} "
                f"| {fmt(means['lpips'])} | {fmt(means['lpips_diversity'])} |")
    summary = [
        "# DreamBooth evaluation", "",
        f"{len(jobs)} jobs over {len(per_subject)} subjects, {total.images} images "
        f"({total.black} all-black images skipped), identifier `{args.token}`.", "",
        *rows, "",
        "LPIPS is real-vs-generated (what the reference code computes); LPIPS diversity compares the images of one "
        "prompt with each other (what the paper's text describes). CLIP-T is scored against the prompt "
        + ("with" if args.clip_t_with_token else "without") + " the identifier.",
        f"Backbones: DINO `{args.dino}`, CLIP `{args.clip}`, LPIPS `{args.lpips_net}` at {args.lpips_resolution} px.",
        f"Paper rows: {PAPER}, measured on SD-1.5 with the paper's backbones; comparable only when run the same way.",
        *(f"Not computed: {name}: {why}." for name, why in not_computed.items()),
        "", "Per subject: `per_subject.csv`; per prompt: `per_prompt.csv`; grids: `grids/`.", "",
    ]
    write_text(output_dir / "summary.md", "\n".join(summary))
    return report


def write_grids(args, jobs):
    """One grid per subject: a row per prompt, a column per image."""
    output_dir = Path(args.output_dir)
    (output_dir / "grids").mkdir(exist_ok=True)
    for subject in dict.fromkeys(job.subject for job in jobs):
        subject_jobs = [job for job in jobs if job.subject == subject]
        images = [load_rgb(p) for job in subject_jobs for p in image_paths(output_dir, job, args.images_per_prompt)]
        save_grid(image_grid(images, rows=len(subject_jobs), cols=args.images_per_prompt),
                  output_dir / "grids" / f"{subject}.png")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    protocol = load_protocol(args.dataset)
    jobs = protocol.jobs(args.subjects, args.prompts)
    # Read the real photos first: a corrupt one stops the run before hours of generation.
    real_images = {name: [load_rgb(p) for p in protocol.subjects[name].images] for name in dict.fromkeys(j.subject for j in jobs)}
    adapters = None
    if args.skip_generation:  # scoring the first images_per_prompt of more is fine: the report counts what it scored
        harness.check_generated(args.output_dir, {**generation_settings(args), "images_per_prompt": None})
    else:
        adapters = (adapters_from_manifest(args.manifest, jobs) if args.manifest
                    else adapters_from_dir(args.adapters, jobs, args.adapter_file))
        if args.subjects_per_batch > 1:  # every file an adapter file of one method and setting
            adapter_batch.check_batchable(dict.fromkeys(adapters.values()))
        for adapter in set(adapters.values()):  # headers only, before any generation (tensors: as each loads)
            check_adapter_or_lora(adapter)

    def report(device):
        tallies = score(args, protocol, jobs, real_images, device)
        result = write_reports(args, protocol, jobs, tallies)
        write_grids(args, jobs)
        return result

    return harness.run(args, lambda accelerator: generate(args, jobs, adapters, accelerator), report)


if __name__ == "__main__":
    run_cli(main)

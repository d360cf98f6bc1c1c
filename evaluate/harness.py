"""What both evaluators share, each keeping its own protocol: the arguments they take alike and their checks,
the generate-then-score skeleton, the split of pending work over processes, per-item seeds, the record of what
made the images, number formatting and the paper's rows in the reports."""
import json
import math
import zlib
from pathlib import Path

from accelerate import Accelerator

from ether_diffusion import checks
from ether_diffusion.devices import share_cpu_cores
from ether_diffusion.errors import UserError
from ether_diffusion.export import file_sha256
from ether_diffusion.files import check_output_folder, read_json, write_text

# What made the images in an output folder: the settings of the generation (model, seed, guidance, steps,
# ...) and one fingerprint per item (the adapter file's hash, the prompt). Images are reused only under the
# same record; a rerun with other settings or adapters makes them again.
GENERATION_RECORD = "generation.json"


def fmt(value, scale=1.0, digits=4) -> str:
    """A number for a table cell; empty for None or NaN (a metric nothing was scored for)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"


def add_common_args(parser):
    """The arguments both evaluators take alike: the base model, where the images go, how they are sampled and
    which half of the run to do. Each evaluator adds its own (data, adapters, metrics, --resolution's default)."""
    parser.add_argument("--pretrained_model_name_or_path", "--model", default=None,
                        help="base model: hub id, local folder or builtin:tiny-sd (needed unless --skip_generation)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="dtype for generation")
    parser.add_argument("--skip_generation", action="store_true", help="only score the images already in --output_dir")
    parser.add_argument("--skip_metrics", action="store_true", help="only generate")


def parse_args(parser, argv):
    """`parser.parse_args(argv)`, then the checks the common arguments (and --resolution) need, before any file is
    read or model loaded."""
    args = parser.parse_args(argv)
    check_output_folder(args.output_dir, "--output_dir")
    checks.at_least(args, 1, "num_inference_steps")
    checks.resolution(args, "resolution")
    checks.seed(args, "seed")
    return args


def without_nan(metrics: dict, reasons: dict) -> tuple[dict, dict]:
    """(metrics with None for each NaN/inf value, {name: why it is None}). JSON has no NaN (Python writes a
    bare `NaN` token that strict readers reject), and a metric that could not be computed needs its reason
    beside it; `reasons` gives them (a default for any other)."""
    values, why = {}, {}
    for name, value in metrics.items():
        if value is None or not math.isfinite(value):
            values[name], why[name] = None, reasons.get(name, "not computed")
        else:
            values[name] = value
    return values, why


def write_json(path, data) -> Path:
    """Strict JSON (a NaN left in `data` is an error here, not an invalid file), written whole or not at all."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def item_seed(base_seed: int, key: str) -> int:
    """A seed that depends only on the item (a job, a map name), so any split or resumed run draws the same
    images."""
    return (base_seed + zlib.crc32(key.encode())) % 2**31


def same_path(value: str | None) -> str | None:
    """A model or dataset as the record names it: a local path absolute (however it was written: relative,
    with a trailing /), anything else (a hub id, `builtin:tiny-sd`, a prompt) as given. A path is what exists,
    or lies below a folder that does (a run's folder before it is made)."""
    try:
        if not value or not (Path(value).exists() or Path(Path(value).parts[0]).is_dir()):
            return value
        return str(Path(value).resolve())
    except (OSError, ValueError):  # too long for a name (a file's text), a NUL: not a path
        return value


def files_sha256(paths) -> dict[str, str]:
    """{file name: SHA-256} of the files among `paths` that exist: what an item's images were made from."""
    return {Path(p).name: file_sha256(p) for p in paths if Path(p).is_file()}


def start_generation(accelerator, output_dir, settings: dict, fingerprints, paths_of):
    """Before any process lists its pending items: on the main process, compare the folder's record
    (`GENERATION_RECORD`) with this run's `settings` and `fingerprints()` ({item key: what made it}), delete
    the images (`paths_of(key)`) of every item made otherwise (every item, when the settings differ), and
    write the new record. Images without a record (an older version's) are made again too."""
    if accelerator.is_main_process:
        path = Path(output_dir, GENERATION_RECORD)
        record = read_json(path) or {}
        items = fingerprints()
        kept = record.get("items", {}) if record.get("settings") == settings else {}
        stale = [key for key, made_by in items.items() if kept.get(key) != made_by]
        for key in stale:
            for image in paths_of(key):
                Path(image).unlink(missing_ok=True)
        if stale and kept:
            print(f"{len(stale)} item(s) were made by another adapter or prompt: generating them again")
        elif stale and record:
            print(f"the images in {output_dir} were made with other settings: generating them again")
        write_json(path, {"settings": settings, "items": {**kept, **items}})
    accelerator.wait_for_everyone()


def check_generated(output_dir, settings: dict):
    """--skip_generation: the images must have been made with the `settings` given (those not None; a folder
    without a record is scored as it is), or the report would name settings that did not make them."""
    record = read_json(Path(output_dir, GENERATION_RECORD))
    if not record:
        return
    for key, value in settings.items():
        made = record.get("settings", {}).get(key)
        if value is not None and made != value:
            raise UserError(f"the images in {output_dir} were generated with {key}={made!r}, but this run asks for "
                            f"{key}={value!r}: rerun without --skip_generation to generate them again, or give the "
                            "same settings")


def my_share(accelerator, items, is_done, what: str) -> list:
    """This process's part of the items that are not done yet. Every process lists the pending items before
    any writes, so all split the same list."""
    pending = [item for item in items if not is_done(item)]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"{len(items) - len(pending)} of {len(items)} {what} already done; generating {len(pending)} "
              f"on {accelerator.num_processes} process(es)")
    with accelerator.split_between_processes(pending) as mine:
        return list(mine)


def run(args, generate, report):
    """Generation over every process (`generate(accelerator)`, unless --skip_generation), then scoring on the
    main process (`report(device) -> dict with "metrics"`, unless --skip_metrics). Returns the report (None
    off the main process)."""
    accelerator = Accelerator()
    share_cpu_cores(accelerator)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if not args.skip_generation:
        generate(accelerator)
    accelerator.wait_for_everyone()
    result = None
    if accelerator.is_main_process and not args.skip_metrics:
        result = report(accelerator.device)
        print(json.dumps(result["metrics"]))
        print(f"wrote {Path(args.output_dir) / 'summary.md'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result

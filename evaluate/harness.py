"""What both evaluators share, each keeping its own protocol: the generate-then-score skeleton, the split
of pending work over processes, per-item seeds, number formatting and the paper's rows in the reports."""
import json
import math
import zlib
from pathlib import Path

from accelerate import Accelerator

from ether_diffusion import checks
from ether_diffusion.devices import share_cpu_cores
from ether_diffusion.files import check_output_folder, write_text


def fmt(value, scale=1.0, digits=4) -> str:
    """A number for a table cell; empty for None or NaN (a metric nothing was scored for)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"


def check_common_args(args):
    """The checks both evaluators' shared arguments need, before any file is read or model loaded."""
    check_output_folder(args.output_dir, "--output_dir")
    checks.at_least(args, 1, "num_inference_steps")
    checks.resolution(args, "resolution")
    checks.seed(args, "seed")


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

"""`builtin:` values: models and data the project makes itself, accepted wherever a model, a subject's
image folder or a dataset folder is, so a machine with no hub and no downloads can run everything.

| value                  | where it is accepted                          | what it is                                   |
|------------------------|-----------------------------------------------|----------------------------------------------|
| `builtin:tiny-sd`      | `--pretrained_model_name_or_path`, `--model`  | a tiny random SD (`tiny_sd.py`), for plumbing |
| `builtin:toy-sd`       | `--pretrained_model_name_or_path`, `--model`  | the toy world's SD, pretrained and shipped (`toy/model.py`) |
| `builtin:toy-subject/<name>` | `--instance_data_dir`                   | a toy-world subject's photos (`toy/world.py`) |
| `builtin:demo-subject` | `--instance_data_dir`                         | the qwe toy's photos (the subject star_toy)  |
| `builtin:tiny-ade20k`  | `--train_data_dir`                            | a tiny random ADE20K folder (`tiny_ade20k.py`) |
| `builtin:toy-ade20k`   | `--train_data_dir`                            | the toy world's label maps: 512 training, 64 validation (`toy/world.py`) |

Models are built once into a cache folder (`$ETHER_DIFFUSION_CACHE`, default `~/.cache/ether_diffusion`);
data is written once into the run's output folder. Both go through `files.build_folder_once` or atomic
image writes, so processes that start together never read a half-written model or dataset.
"""
from pathlib import Path

from .errors import UserError, writing
from .files import build_folder_once, check_output_folder
from .tiny_ade20k import write_tiny_ade20k
from .tiny_sd import TINY_VERSION, build_tiny_sd, cache_root

TINY_SD = "builtin:tiny-sd"
TOY_SD = "builtin:toy-sd"
TOY_SUBJECT = "builtin:toy-subject/"
DEMO_SUBJECT = "builtin:demo-subject"
TINY_ADE20K = "builtin:tiny-ade20k"
TOY_ADE20K = "builtin:toy-ade20k"


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:tiny-sd` -> its cached folder (built on first use), `builtin:toy-sd` -> the toy world's SD
    (assembled once from the package's weights); a hub id or folder unchanged."""
    if name_or_path == TINY_SD:
        return str(build_in_cache(f"tiny-sd-v{TINY_VERSION}", build_tiny_sd))
    if name_or_path == TOY_SD:
        from .toy.model import toy_sd_path  # the toy world loads only when a toy name is asked for

        return str(toy_sd_path())
    # A hub id is "org/name"; something that starts like a path is a folder and must exist, so the user
    # gets "not found" instead of the hub client's complaint about repo id characters.
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not path.exists():
        raise UserError(f"model folder not found: {name_or_path}")
    if path.is_file():
        raise UserError(f"{name_or_path} is a file, not a diffusers model folder or hub id")
    return name_or_path


def build_in_cache(name: str, build) -> Path:
    """The cache's folder `name`, built once by `build(folder)` (`files.build_folder_once`). A cache where it
    cannot be built (HOME or ETHER_DIFFUSION_CACHE naming a file, a read-only folder) is one line saying what to
    set, before anything is built; a read-only cache that already holds it is used as it is."""
    target = cache_root() / name
    if not target.is_dir():
        try:
            check_output_folder(target, "the built-in model cache")
        except UserError as e:
            raise UserError(f"{e}: set ETHER_DIFFUSION_CACHE to a folder you can write") from None
    with writing(target):
        return build_folder_once(target, build)


def resolve_instance_dir(value: str, output_dir) -> Path:
    """`builtin:toy-subject/<name>` -> `<output_dir>/toy-subject-<name>` and `builtin:demo-subject` ->
    `<output_dir>/demo-subject` (the qwe toy, star_toy), drawn there once; a folder unchanged."""
    if not value.startswith("builtin:"):
        return Path(value)
    from .toy import world

    if value == DEMO_SUBJECT:
        name, folder = world.DEMO_SUBJECT, Path(output_dir, "demo-subject")
    elif value.startswith(TOY_SUBJECT):
        name = value[len(TOY_SUBJECT):]
        if name not in world.SUBJECTS:
            raise UserError(f"--instance_data_dir {value}: the toy world has no subject {name!r} "
                            f"(choose from {', '.join(world.SUBJECTS)})")
        folder = Path(output_dir, f"toy-subject-{name}")
    else:
        raise UserError(f"--instance_data_dir {value}: unknown built-in subject (choose {DEMO_SUBJECT} or "
                        f"{TOY_SUBJECT}<name>)")
    with writing(folder):
        return build_folder_once(folder, lambda tmp: world.write_subject(tmp, name))


def _write_toy_ade20k(folder):
    from .toy import world  # the toy world loads only when its data is asked for

    world.write_ade20k(folder, n_train=512, n_val=64)


# value -> (its folder's name in the run's output folder, the writer); each has metadata.jsonl captions
BUILTIN_DATA = {TINY_ADE20K: ("tiny-ade20k", lambda folder: write_tiny_ade20k(folder, n_train=8, n_val=2, size=64)),
                TOY_ADE20K: ("toy-ade20k", _write_toy_ade20k)}


def resolve_data_dir(value: str, output_dir) -> Path:
    """`builtin:tiny-ade20k` -> `<output_dir>/tiny-ade20k` and `builtin:toy-ade20k` -> `<output_dir>/toy-ade20k`,
    written there once; a folder unchanged."""
    if value in BUILTIN_DATA:
        name, write = BUILTIN_DATA[value]
        folder = Path(output_dir, name)
        with writing(folder):
            return build_folder_once(folder, write)
    if value.startswith("builtin:"):
        raise UserError(f"--train_data_dir {value}: unknown built-in dataset (choose {' or '.join(BUILTIN_DATA)})")
    return Path(value)


def builtin_caption_file(value: str, data_dir) -> str | None:
    """The captions a built-in dataset comes with (its `metadata.jsonl`); None for a folder of the user's."""
    return str(Path(data_dir, "ADEChallengeData2016", "metadata.jsonl")) if value in BUILTIN_DATA else None

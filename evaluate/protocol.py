"""The DreamBooth evaluation protocol: subjects, classes, prompts and jobs, read from the dataset itself.

A DreamBooth dataset folder (google/dreambooth layout) holds one folder of photos per subject and
`prompts_and_classes.txt`, which lists `subject_name,class` pairs and two lists of 25 prompt templates
written as Python (`'a {0} {1} in the jungle'.format(unique_token, class_token)`): one for objects and one
for live subjects. Live subjects are the cats and dogs (the dataset's own split: 9 live, 21 objects).

A job is one (subject, prompt): 30 subjects x 25 prompts = 750 jobs, each generating `images_per_prompt`
images of `prompt_with_token` ("a qwe dog in the jungle"). CLIP-T scores an image against the prompt
without the identifier by default ("a dog in the jungle").
"""
import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.errors import UserError
from ether_diffusion.files import image_files

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    live: bool
    images: tuple[Path, ...]


@dataclass(frozen=True)
class Job:
    subject: str
    prompt_index: int
    template: str  # 'a {0} {1} in the jungle'
    class_name: str

    def prompt(self, token: str | None) -> str:
        """The prompt with `token` as the identifier, or without one when `token` is None/empty."""
        return " ".join(self.template.format(token or "", self.class_name).split())

    @property
    def key(self) -> str:
        """The job's name, which its seed is drawn from (`harness.item_seed`)."""
        return f"{self.subject}/{self.prompt_index}"


@dataclass
class DreamBoothProtocol:
    root: Path
    subjects: dict[str, Subject]
    object_prompts: list[str]
    live_prompts: list[str]

    def prompts_for(self, subject: str) -> list[str]:
        return self.live_prompts if self.subjects[subject].live else self.object_prompts

    def check_photos(self, names):
        """The subjects `names` have their photos: a subject's missing folder stops only the work on it."""
        for name in names:
            if not self.subjects[name].images:
                raise UserError(f"{self.root / name}: subject {name} listed in {self.root / PROMPTS_FILE} has no image "
                                "folder or no images in it")

    def jobs(self, subjects=None, prompt_indices=None) -> list[Job]:
        """Every (subject, prompt) job, optionally restricted to some subjects and prompt indices."""
        names = list(self.subjects) if subjects is None else list(subjects)
        for name in names:
            if name not in self.subjects:
                raise UserError(f"unknown subject {name!r}; {self.root / PROMPTS_FILE} lists {sorted(self.subjects)}")
        self.check_photos(names)
        jobs = []
        for name in names:
            templates = self.prompts_for(name)
            indices = range(len(templates)) if prompt_indices is None else prompt_indices
            for index in indices:
                if not 0 <= index < len(templates):
                    raise UserError(f"prompt index {index} is out of range: subject {name} has {len(templates)} prompts")
                jobs.append(Job(name, index, templates[index], self.subjects[name].class_name))
        return jobs


def _sections(lines):
    """Split the file at its headings; returns {heading: [lines]} for the headings we need."""
    headings = {"Classes": "classes", "Prompts": None, "Object Prompts": "object", "Live Subject Prompts": "live"}
    sections, current = {}, None
    for line in lines:
        stripped = line.strip()
        if stripped in headings:
            current = headings[stripped]
            if current is not None:
                sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _parse_templates(lines, path, heading) -> list[str]:
    templates = []
    for line in lines:
        match = _TEMPLATE.match(line)
        if match:
            templates.append(match.group(2))
    if not templates:
        raise UserError(f"{path}: no prompt templates found under '{heading}'")
    for template in templates:
        if "{0}" not in template or "{1}" not in template:
            raise UserError(f"{path}: prompt {template!r} lacks the {{0}} (token) or {{1}} (class) placeholder")
    return templates


def load_protocol(root) -> DreamBoothProtocol:
    """Read `root/prompts_and_classes.txt` and list every subject's photos (a subject without any is refused
    where it is used, `DreamBoothProtocol.check_photos`: the others can still be evaluated)."""
    root = Path(root)
    path = root / PROMPTS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected the DreamBooth dataset layout: <subject>/*.jpg + {PROMPTS_FILE})")
    sections = _sections(path.read_text(encoding="utf-8").splitlines())
    for key, heading in (("classes", "Classes"), ("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if key not in sections:
            raise UserError(f"{path}: no '{heading}' section")

    rows = [line for line in sections["classes"] if line.strip()]
    subjects = {}
    for row in csv.DictReader(rows):
        name, class_name = (row.get("subject_name") or "").strip(), (row.get("class") or "").strip()
        if not name or not class_name:
            raise UserError(f"{path}: bad class line {row!r} (expected subject_name,class)")
        folder = root / name
        images = tuple(image_files(folder)[0]) if folder.is_dir() else ()  # none: an error once used (check_photos)
        subjects[name] = Subject(name, class_name, class_name in LIVE_CLASSES, images)
    if not subjects:
        raise UserError(f"{path}: the Classes section lists no subjects")

    return DreamBoothProtocol(root, subjects,
                              _parse_templates(sections["object"], path, "Object Prompts"),
                              _parse_templates(sections["live"], path, "Live Subject Prompts"))


# ------------------------------------------------------------------------------------------------ adapters
def adapters_from_dir(folder, jobs, filename: str = ADAPTER_FILE) -> dict[tuple[str, int], Path]:
    """One adapter per subject: `folder/<subject>/<filename>` for every job's subject (an adapter file, or a
    LoRA file exported from one)."""
    folder = Path(folder)
    adapters = {}
    for job in jobs:
        path = folder / job.subject / filename
        if not path.is_file():
            raise UserError(f"missing adapter for subject {job.subject}: {path} does not exist")
        adapters[(job.subject, job.prompt_index)] = path
    return adapters


def adapters_from_manifest(manifest, jobs) -> dict[tuple[str, int], Path]:
    """One adapter per (subject, prompt), from a CSV with header `subject,prompt_index,adapter`. Relative
    adapter paths are taken relative to the CSV's folder. Every job must have exactly one row."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} does not exist")
    rows = {}
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"subject", "prompt_index", "adapter"} <= set(reader.fieldnames):
            raise UserError(f"manifest {manifest}: the header must name the columns subject,prompt_index,adapter")
        for line_number, row in enumerate(reader, start=2):
            try:
                key = (row["subject"].strip(), int(row["prompt_index"]))
            except (ValueError, AttributeError):
                raise UserError(f"manifest {manifest} line {line_number}: prompt_index {row['prompt_index']!r} is not an integer") from None
            if key in rows:
                raise UserError(f"manifest {manifest} line {line_number}: ({key[0]}, {key[1]}) appears twice")
            path = Path(row["adapter"].strip())
            rows[key] = path if path.is_absolute() else manifest.parent / path
    adapters = {}
    for job in jobs:
        key = (job.subject, job.prompt_index)
        if key not in rows:
            raise UserError(f"manifest {manifest} has no adapter for subject {job.subject}, prompt {job.prompt_index}")
        if not rows[key].is_file():
            raise UserError(f"missing adapter for subject {job.subject}, prompt {job.prompt_index}: {rows[key]} does not exist")
        adapters[key] = rows[key]
    return adapters

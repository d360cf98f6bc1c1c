"""Optional packages a flag needs, checked with the other arguments: a missing one stops the run before any
work (class images, model loading), not when the flag is first used. (`--report_to`'s trackers are checked by
`arguments.check_report_to`, the hub by `hub.check_hub_args`.)"""
import importlib.util

from .errors import UserError

# flag: (package to import, what to do instead)
FLAG_PACKAGES = {
    "enable_xformers_memory_efficient_attention": ("xformers", "leave the flag out: PyTorch's attention is used"),
    "use_8bit_adam": ("bitsandbytes", "leave the flag out for torch's AdamW"),
}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_packages(args):
    for flag, (package, instead) in FLAG_PACKAGES.items():
        if getattr(args, flag) and not installed(package):
            raise UserError(f"--{flag} needs {package}, which is not installed: pip install {package}, or {instead}")

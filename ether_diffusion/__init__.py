"""ether-diffusion: ETHER and ETHER+ finetuning (hyperplane reflections) for Stable Diffusion."""
from .adapter_file import load_adapter, save_adapter
from .adapters import AdapterConfig, inject_adapters, merge_adapters

__all__ = ["AdapterConfig", "inject_adapters", "save_adapter", "load_adapter", "merge_adapters"]
__version__ = "0.1.0"

"""diffusers' example flags this project does not implement: each is refused in one line that says why and what
to use instead, so a pasted diffusers command never loses a setting without a word. The whole table, flag by
flag (implemented, differs, refused), is docs/diffusers_flags.md; tests/test_diffusers_flags.py checks that it
and the trainers' parsers agree.
"""
import argparse

from .errors import UserError

# flag: why it is refused, and what to use instead (the user's line is `--flag: <why>`)
REFUSED = {
    # DreamBooth (train_dreambooth.py, train_dreambooth_lora.py)
    "tokenizer_max_length": "not supported: CLIP was trained on 77 tokens and every pipeline that samples the "
                            "adapter pads to 77; leave it out",
    "text_encoder_use_attention_mask": "not supported: Stable Diffusion's CLIP text encoder runs without a mask, "
                                       "in training as in the pipelines (the flag is for DeepFloyd IF's T5); leave it out",
    "validation_images": "not supported: it is for image-to-image pipelines (image variation, super-resolution); "
                         "use --validation_prompt",
    "class_labels_conditioning": "not supported: it is for DeepFloyd IF's upscaler UNet; Stable Diffusion's UNet "
                                 "takes no class labels",
    "skip_save_text_encoder": "not needed: the output is an adapter file, no text encoder is saved "
                              "(--export_merged writes a whole pipeline)",
    # ControlNet (train_controlnet.py)
    "controlnet_model_name_or_path": "not supported: there is no ControlNet here (a signal encoder into conv_in and "
                                     "adapters on the UNet); continue a run with --resume_from_checkpoint",
    "enable_npu_flash_attention": "not supported: it needs Ascend NPUs (torch_npu); PyTorch's attention is used",
}

DREAMBOOTH_REFUSED = ("tokenizer_max_length", "text_encoder_use_attention_mask",
                      "validation_images", "class_labels_conditioning", "skip_save_text_encoder")
CONTROLNET_REFUSED = ("controlnet_model_name_or_path", "enable_npu_flash_attention")


class Refused(argparse.Action):
    """An argument that is a `UserError` when given, with or without values (on the command line or in --config)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="*", default=None, help=argparse.SUPPRESS)

    def refuse(self):
        raise UserError(f"{self.option_strings[0]}: {REFUSED[self.dest]}")

    def __call__(self, parser, namespace, values, option_string=None):
        self.refuse()


def add_refused_args(parser, names):
    for name in names:
        parser.add_argument(f"--{name}", action=Refused)

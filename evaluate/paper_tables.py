"""The ETHER paper's own numbers, printed beside ours in the evaluation reports.

Bini, Roth, Akata, Khoreva. "ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections",
ICML 2024, arXiv 2405.20271: Table 2 (DreamBooth, 30 subjects x 25 prompts x 4 images, SD-1.5) and Table 3
(S2I on ADE20K, 2000 validation maps, UperNet-101 mIoU/Acc, FID). They were measured on the real SD-1.5 with
the paper's protocol and backbones; ours are comparable only when run the same way.
"""
PAPER = "Bini et al., ETHER, ICML 2024 (arXiv 2405.20271)"

# (method, #params, DINO, CLIP-I, CLIP-T, LPIPS); None where the paper prints "-".
TABLE_2 = [
    ("Real Images", None, 0.703, 0.864, None, 0.695),
    ("DreamBooth", "859.5M", 0.644, 0.793, 0.236, 0.709),
    ("LoRA r=4", "0.8M", 0.660, 0.796, 0.231, 0.714),
    ("OFT n=4", "11.6M", 0.652, 0.794, 0.241, 0.725),
    ("ETHER", "0.1M", 0.567, 0.746, 0.256, 0.766),
    ("ETHER+", "0.4M", 0.666, 0.800, 0.240, 0.729),
]

# (method, #params, mIoU %, Acc %, FID)
TABLE_3 = [
    ("Encoder-only", "0", 8.2, 38.0, 41.2),
    ("OFT n=4", "13.2M", 24.5, 62.8, 31.1),
    ("OFT n=4 (+ magnitude re-fitting)", "13.4M", 24.6, 63.3, 30.8),
    ("ETHER", "0.1M", 24.6, 63.3, 32.0),
    ("ETHER+", "0.4M", 27.3, 68.1, 31.0),
]

# Which paper row each of our methods reproduces (at its paper learning rate). Naive and HRA have no row in
# Tables 2/3; "none" is the S2I trainer's encoder-only run.
PAPER_ROW_OF_METHOD = {
    "dreambooth": {"lora": "LoRA r=4", "oft": "OFT n=4", "ether": "ETHER", "ether+": "ETHER+"},
    "s2i": {"none": "Encoder-only", "oft": "OFT n=4", "ether": "ETHER", "ether+": "ETHER+"},
}

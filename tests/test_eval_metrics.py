"""Known answers for the evaluation metrics, on the tiny offline stand-in backbones."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ether_diffusion.errors import run_cli
from evaluate import tiny_backbones
from evaluate.tiny_backbones import write_tiny_backbones
from evaluate.metrics import (ClipEmbedder, DinoEmbedder, LpipsDistance, SegmentationScores, UperNetSegmenter,
                              cosine_matrix, is_all_black, load_fid_features, load_lpips, make_fid)
from evaluate.metrics.similarity import parse_clip_spec
from user_errors import record, refused

EVALUATORS = "evaluate/dreambooth.py, evaluate/s2i.py"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return write_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def _images(n, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------------- DINO / CLIP / LPIPS
def test_identical_images_give_similarity_one_and_lpips_zero(backbones):
    images, others = _images(3), _images(3, seed=1)
    for embed in (DinoEmbedder(str(backbones["dino"])).images, ClipEmbedder(str(backbones["clip"])).images):
        same = torch.diagonal(cosine_matrix(embed(images), embed(images)))
        torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
        different = torch.diagonal(cosine_matrix(embed(images), embed(others)))
        assert (different < 1 - 1e-4).all()

    lpips = LpipsDistance(str(backbones["lpips"]), resolution=64)
    assert lpips(images, images).abs().max() < 1e-6
    assert (lpips(images, others) > 1e-4).all()
    # pairs() indexes prepared tensors: (0, 0) is an identical pair, (0, 1) is not
    prepared = lpips.prepare(images)
    distances = lpips.pairs(prepared, prepared, [(0, 0), (0, 1)])
    assert distances[0].abs() < 1e-6 < distances[1]


def test_dino_accepts_an_open_clip_folder_and_uses_the_unprojected_image_token(backbones):
    images = _images(3)
    dino, clip = DinoEmbedder(str(backbones["clip"])), ClipEmbedder(str(backbones["clip"]))
    unprojected, projected = dino.images(images), clip.images(images)
    width, embed_dim = clip.model.visual.proj.shape
    assert unprojected.shape == (3, width) and projected.shape == (3, embed_dim)
    torch.testing.assert_close(unprojected @ clip.model.visual.proj, projected, atol=1e-5, rtol=1e-5)
    assert clip.model.visual.proj is not None  # restored


def test_clip_text_features_and_raw_cosine(backbones):
    clip = ClipEmbedder(str(backbones["clip"]))
    texts = clip.texts(["a dog in the jungle", "a cube shaped backpack", "a dog in the jungle"])
    assert texts.shape == (3, 16)
    sims = cosine_matrix(clip.images(_images(2)), texts)
    assert sims.shape == (2, 3) and (sims.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(sims[:, 0], sims[:, 2])  # same text, same score
    # raw cosine: no logit scale, no clipping at 0 (a random model gives negative values too)
    assert not torch.allclose(sims[:, 0], sims[:, 1])


@pytest.mark.user_error("a --clip value without :PRETRAINED, or an unknown pretrained tag", tool=EVALUATORS)
def test_clip_spec_forms(tmp_path):
    assert parse_clip_spec("ViT-L-14:openai") == ("ViT-L-14", "openai")
    assert parse_clip_spec("ViT-L-14:/w/clip.safetensors") == ("ViT-L-14", "/w/clip.safetensors")
    assert parse_clip_spec("hf-hub:laion/x") == ("hf-hub:laion/x", None)
    assert parse_clip_spec(str(tmp_path)) == (f"local-dir:{tmp_path}", None)
    with refused("MODEL:PRETRAINED"):
        parse_clip_spec("ViT-L-14")
    with refused("no pretrained tag 'nope'"):
        ClipEmbedder("ViT-L-14:nope")


@pytest.mark.user_error("backbone paths that do not load (--dino, --lpips_net, --segmenter, --inception)",
                        tool=EVALUATORS)
def test_backbone_paths_that_do_not_load_are_user_errors(tmp_path):
    with refused("--dino"):
        DinoEmbedder(str(tmp_path / "missing"))
    with refused("--lpips_net"):
        load_lpips(str(tmp_path))  # a folder without lpips_config.json
    with refused("--segmenter"):
        UperNetSegmenter(str(tmp_path / "missing"))
    with refused("no such file"):
        load_fid_features(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, wrong)
    with refused("not torch-fidelity's InceptionV3 weights"):
        load_fid_features(str(wrong))


@pytest.mark.user_error("--help (wrote a folder named --help)", tool="python -m evaluate.tiny_backbones")
def test_tiny_backbones_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tiny_backbones.main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert e.value.code == 0 and usage == "usage: python -m evaluate.tiny_backbones [-h] [--seed SEED] output_dir"
    record(usage)
    assert list(tmp_path.iterdir()) == []  # no folder named --help
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as e:
        run_cli(tiny_backbones.main, ["a-file"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: output_dir a-file is a file, not a folder\n"


# ------------------------------------------------------------------------------------------- images
def test_all_black_detection():
    black = Image.new("RGB", (8, 8))
    assert is_all_black(black)
    almost = np.zeros((8, 8, 3), dtype=np.uint8)
    almost[3, 4, 1] = 1
    assert not is_all_black(Image.fromarray(almost))


# ------------------------------------------------------------------------------------------- mIoU / accuracy
def test_miou_and_accuracy_on_hand_made_maps():
    # 3 classes. Target has one ignored (0) pixel, which the prediction labels 2: it must count nowhere
    # (counted, class 2's union would be 5 and its IoU 2/5).
    target = np.array([[1, 1, 2],
                       [2, 2, 0]])
    predicted = np.array([[1, 2, 2],
                          [2, 3, 2]])
    scores = SegmentationScores(num_classes=3)
    scores.update(predicted, target)
    result = scores.compute()
    # labelled pixels: 5; correct: (0,0)=1, (0,2)=2, (1,0)=2 -> 3 -> accuracy 3/5
    assert result["accuracy"] == pytest.approx(3 / 5)
    # class 1: inter 1, union |P1 u T1| = {(0,0),(0,1)} = 2 -> 1/2
    # class 2: inter 2 ((0,2),(1,0)), P2 = {(0,1),(0,2),(1,0)}, T2 = {(0,2),(1,0),(1,1)} -> union 4 -> 1/2
    # class 3: inter 0, P3 over labelled pixels = {(1,1)}, T3 = {} -> union 1 -> 0
    assert result["per_class_iou"] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert result["miou"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert result["labelled_pixels"] == 5


def test_miou_sums_over_images_and_skips_absent_classes():
    scores = SegmentationScores(num_classes=4)
    scores.update(np.array([[1, 1], [1, 1]]), np.array([[1, 1], [1, 2]]))  # class 1: I=3, U=4; class 2: I=0, U=1
    scores.update(np.array([[2, 2]]), np.array([[2, 2]]))                    # class 2: I=2, U=2
    result = scores.compute()
    # totals: class 1 3/4; class 2 I=2, U=1+2=3 -> 2/3; classes 3, 4 absent everywhere -> left out of the mean
    assert result["per_class_iou"][:2] == pytest.approx([3 / 4, 2 / 3])
    assert result["per_class_iou"][2:] == [None, None]
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)  # not the mean of per-image mIoUs
    assert result["accuracy"] == pytest.approx(5 / 6)


def test_upernet_stand_in_segments_at_image_size(backbones):
    segmenter = UperNetSegmenter(str(backbones["upernet"]))
    maps = segmenter(_images(2, size=(40, 48)))
    assert [m.shape for m in maps] == [(40, 48), (40, 48)]
    assert all(m.min() >= 1 and m.max() <= 150 for m in maps)


# ------------------------------------------------------------------------------------------- FID
class FeaturesAsInput(torch.nn.Module):
    """A 'feature extractor' that returns its input, so the features FID sees are chosen by the test."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def _samples_with_moments(mean, cov, n, seed):
    """n points whose sample mean and (n-1)-normalised covariance are exactly `mean` and `cov`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    whitening = torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1)))
    z = z @ whitening.T
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_distance_of_gaussians_matches_closed_form():
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Covariances sharing eigenvectors (a rotation), so the closed form is
    # |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    angle = torch.tensor(0.6, dtype=torch.float64)
    c, s = torch.cos(angle), torch.sin(angle)
    rotation = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    cov1, cov2 = rotation @ torch.diag(a) @ rotation.T, rotation @ torch.diag(b) @ rotation.T
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # 5 + 4 + 1 + 0.25 = 10.25

    fid = FrechetInceptionDistance(feature=FeaturesAsInput(3))
    fid.update(_samples_with_moments(mu1, cov1, 50, seed=0), real=True)
    fid.update(_samples_with_moments(mu2, cov2, 40, seed=1), real=False)
    assert expected == pytest.approx(10.25)
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-6)


def test_fid_on_the_stand_in(backbones):
    images = torch.from_numpy(np.stack([np.asarray(im) for im in _images(6)])).permute(0, 3, 1, 2)
    fid = make_fid(str(backbones["inception"]))
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-6
    fid = make_fid(str(backbones["inception"]))
    fid.update(images, real=True)
    fid.update(255 - images, real=False)
    distance = float(fid.compute())
    assert math.isfinite(distance) and distance > 1e-4

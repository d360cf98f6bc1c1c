"""Reading and writing files one way: named errors for unreadable images, nothing half-written."""
import os
import stat
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ether_diffusion.errors import UserError
from ether_diffusion.files import (build_folder_once, check_image_output, check_output_folder, image_files, load_rgb,
                                   save_image, write_folder, write_text)
from user_errors import case, refused

IMAGES = "every image reader (training photos, class images, evaluators)"
SAMPLE = "python -m ether_diffusion.sample"  # (--grid out.txt and a folder: tests/test_sample.py)


@pytest.mark.user_error("a truncated image, or a missing one", tool=IMAGES)
def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "00.jpg"
    good = tmp_path / "01.png"
    Image.new("RGB", (8, 8), "red").save(good)
    bad.write_bytes(good.read_bytes()[:40])  # a truncated PNG behind a .jpg name
    assert load_rgb(good).size == (8, 8)
    with refused("00.jpg: cannot read image"):
        load_rgb(bad)
    with refused("does not exist"):
        load_rgb(tmp_path / "02.jpg")


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (8, 4), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (4, 8)


def write_png16(path, pixels: np.ndarray):
    """A real 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis), written by hand: PIL writes 16-bit
    PNGs only in grey."""
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


RAMP16 = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)  # black to white


@pytest.mark.parametrize("channels", [
    pytest.param(1, marks=pytest.mark.user_error("a 16-bit grey PNG (read as 99.8% white)", tool=IMAGES), id="grey"),
    pytest.param(2, id="grey+alpha"), pytest.param(3, id="RGB"), pytest.param(4, id="RGBA")])
def test_16_bit_pngs_are_scaled_to_8_bit(tmp_path, channels):
    """PIL reads a 16-bit grey PNG as mode I;16 and its convert("RGB") clips at 255: a ramp read 99.6% white."""
    opaque = np.full_like(RAMP16, 65535)
    pixels = {1: RAMP16, 2: np.stack([RAMP16, opaque], -1), 3: np.stack([RAMP16, RAMP16 // 2, 65535 - RAMP16], -1),
              4: np.stack([RAMP16, RAMP16 // 2, 65535 - RAMP16, opaque], -1)}[channels]
    rgb = np.asarray(load_rgb(write_png16(tmp_path / "a.png", pixels))).astype(int)
    grey = np.round(RAMP16 / 257)
    assert np.abs(rgb[..., 0] - grey).max() <= 1  # the ramp, not white
    if channels >= 3:
        assert np.abs(rgb[..., 2] - np.round((65535 - RAMP16) / 257)).max() <= 1


@pytest.mark.user_error("a float TIFF (read as black)", tool=IMAGES)
def test_float_tiff_in_0_to_1_is_scaled_to_8_bit(tmp_path):
    """A float TIFF (mode F) of values 0..1 read black through convert("RGB"), which clips to 0..255."""
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == "F"
    rgb = np.asarray(load_rgb(tmp_path / "a.tif"))
    assert np.array_equal(rgb[..., 0], np.round(ramp * 255).astype(np.uint8)) and np.array_equal(rgb[..., 0], rgb[..., 1])


@pytest.mark.parametrize("values, mode, message", [
    case(np.full((4, 4), 3.5, np.float32), "F", "a mode F image with values 3.5..3.5, outside 0..1",
         "a float image with values outside 0..1", tool=IMAGES),
    case(np.array([[0.5, np.nan]], np.float32), "F", "a mode F image with NaN or infinite values",
         "a float image with NaN pixels", tool=IMAGES),
    case(np.array([[0, 1 << 20]], np.int32), "I", r"a mode I image with values 0..1.04858e\+06, outside 0..65535",
         "a 32-bit integer image beyond 16-bit values", tool=IMAGES),
])
def test_images_whose_range_is_unknown_are_refused_naming_file_and_mode(tmp_path, values, mode, message):
    Image.fromarray(values).save(tmp_path / "odd.tif")
    assert Image.open(tmp_path / "odd.tif").mode == mode
    with refused(f"{tmp_path / 'odd.tif'}: {message}: save it as an 8-bit image" if "outside" in message else message):
        load_rgb(tmp_path / "odd.tif")


@pytest.mark.parametrize("path, message", [
    pytest.param("grid.txt", r"--grid {tmp}/grid.txt: '.txt' is not an image format \(use .png or .jpg\)", id="txt"),
    case("grid", "--grid {tmp}/grid: 'no extension' is not an image format", "--grid without an extension", tool=SAMPLE),
    pytest.param("sub", "--grid {tmp}/sub is a folder; give an image file name such as {tmp}/sub/grid.png", id="folder"),
    case("notes/grid.png", "--grid {tmp}/notes/grid.png: {tmp}/notes is a file, not a folder", "--grid below a file",
         tool=SAMPLE),
])
def test_image_output_paths_are_checked(tmp_path, path, message):
    (tmp_path / "notes").write_text("x")
    (tmp_path / "sub").mkdir()
    check_image_output(tmp_path / "out.png", "--grid")
    check_image_output(tmp_path / "new-folder" / "out.jpg", "--grid")
    with refused(message.format(tmp=tmp_path)):
        check_image_output(f"{tmp_path}/{path}", "--grid")


def test_output_folders_are_checked(tmp_path):
    (tmp_path / "notes").write_text("x")
    check_output_folder(tmp_path / "new" / "deeper", "--output_dir")
    check_output_folder(None, "--out_dir")
    with pytest.raises(UserError, match=f"^--out_dir {tmp_path / 'notes'} is a file, not a folder$"):
        check_output_folder(tmp_path / "notes", "--out_dir")
    with pytest.raises(UserError, match=f"^{tmp_path / 'notes' / 'a' / 'b'}: {tmp_path / 'notes'} is a file, not a folder$"):
        check_output_folder(tmp_path / "notes" / "a" / "b")


def test_write_text_replaces_whole_files(tmp_path):
    write_text(tmp_path / "r" / "summary.md", "one")
    write_text(tmp_path / "r" / "summary.md", "two")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["summary.md"]
    assert (tmp_path / "r" / "summary.md").read_text() == "two"


def test_save_image_leaves_no_temporary_file_and_is_listed(tmp_path):
    path = save_image(Image.new("RGB", (4, 4), "blue"), tmp_path / "sub" / "a.png")
    assert load_rgb(path).getpixel((0, 0)) == (0, 0, 255)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]
    with pytest.raises(Exception):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "sub" / "b.png", format="NOT-A-FORMAT")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # the failed write left nothing
    (tmp_path / "sub" / ".tmp-x.png").write_bytes(b"")  # a leftover of a killed run is not an image
    (tmp_path / "sub" / "notes.txt").write_text("x")
    assert image_files(tmp_path / "sub") == ([tmp_path / "sub" / "a.png"], [tmp_path / "sub" / "notes.txt"])


def test_build_folder_once(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "done").write_text("yes")

    target = build_folder_once(tmp_path / "model", build)
    assert (target / "done").read_text() == "yes" and calls[0] != target
    assert build_folder_once(tmp_path / "model", build) == target and len(calls) == 1  # built once

    def lose_the_race(folder):  # another process renames its copy into place while we build
        (folder / "ours").write_text("x")
        (tmp_path / "raced").mkdir()
        (tmp_path / "raced" / "theirs").write_text("x")

    raced = build_folder_once(tmp_path / "raced", lose_the_race)
    assert [p.name for p in raced.iterdir()] == ["theirs"]

    def fail(folder):
        raise UserError("cannot build")

    with pytest.raises(UserError, match="cannot build"):
        build_folder_once(tmp_path / "broken", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "raced"]  # no half-built folder left


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.user_error("umask 022 on a shared file system: our files must be readable by others", tool="every command")
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
    from trainer_helpers import TinyBlock

    model = TinyBlock()
    inject_adapters(model, AdapterConfig(method="ether", n_blocks=2, target_modules=["to_q"]))
    written = [write_text(tmp_path / "metrics.json", "{}"), save_image(Image.new("RGB", (4, 4)), tmp_path / "grid.png"),
               save_adapter(model, tmp_path / "adapter.safetensors")]
    folders = [write_folder(tmp_path / "merged", lambda f: (f / "model_index.json").write_text("{}")),
               build_folder_once(tmp_path / "tiny-sd", lambda f: (f / "unet").mkdir())]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in written] == [oct(0o666 & ~umask)] * 3
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in folders] == [oct(0o777 & ~umask)] * 2


@pytest.mark.user_error("a merged export killed halfway (its temporary folder, or the older copy of a swap)",
                        tool="python -m ether_diffusion.export")
def test_a_killed_folder_build_leaves_nothing_after_the_next_build(tmp_path):
    killed = tmp_path / ".tmp-merged-k2j4h1x9"  # what a killed `write_folder(tmp_path / "merged", ...)` left
    (killed / "unet").mkdir(parents=True)
    other = tmp_path / ".tmp-merged-v2-k2j4h1x9"  # another target's: not this build's to remove
    other.mkdir()
    (tmp_path / "merged.old").mkdir()  # a swap killed between its two renames
    write_folder(tmp_path / "merged", lambda f: (f / "model_index.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-merged-v2-k2j4h1x9", "merged"]

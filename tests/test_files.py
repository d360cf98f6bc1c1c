"""Reading and writing files one way: named errors for unreadable images, nothing half-written."""
import pytest
from PIL import Image

from ether_diffusion.errors import UserError
from ether_diffusion.files import build_folder_once, image_files, load_rgb, save_image


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "00.jpg"
    good = tmp_path / "01.png"
    Image.new("RGB", (8, 8), "red").save(good)
    bad.write_bytes(good.read_bytes()[:40])  # a truncated PNG behind a .jpg name
    assert load_rgb(good).size == (8, 8)
    with pytest.raises(UserError, match="00.jpg: cannot read image"):
        load_rgb(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_rgb(tmp_path / "02.jpg")


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (8, 4), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (4, 8)


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

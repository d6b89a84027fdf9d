"""Image hygiene: to_rgb on every odd mode, check_images on broken files, the report."""

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from data_scripts import DataArguments, check_images, load_flower_dataset, open_image, to_rgb
from data_scripts.files import atomic_path, write_json


def rgb(img) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(int)


def test_to_rgb_grayscale_and_bilevel():
    assert (rgb(Image.new("L", (3, 2), 77)) == 77).all()
    bilevel = Image.new("1", (2, 2), 0)
    bilevel.putpixel((1, 1), 1)
    assert rgb(bilevel)[1, 1].tolist() == [255, 255, 255] and rgb(bilevel)[0, 0].tolist() == [0, 0, 0]


def test_to_rgb_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (200, 0, 0, 0))  # fully transparent
    assert rgb(rgba).tolist() == [[[200, 0, 0], [255, 255, 255]]]
    half = rgb(Image.new("LA", (1, 1), (0, 128)))
    assert abs(half[0, 0, 0] - 127) <= 1


def test_to_rgb_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert rgb(palette).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    palette.info["transparency"] = 0
    assert rgb(palette).tolist() == [[[255, 255, 255], [40, 50, 60]]]


def test_to_rgb_cmyk():
    assert rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]]]
    assert rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).tolist() == [[[255, 0, 0]]]


def test_to_rgb_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert rgb(img)[0, :, 0].tolist() == [0, 100, 255]  # white stays white
    as_int32 = Image.fromarray(values.astype(np.int32), mode="I")
    assert rgb(as_int32)[0, :, 1].tolist() == [0, 100, 255]
    assert rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F"))[0, :, 2].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="32-bit"):
        to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32), mode="I"))


def jpeg(size=(16, 12), colour=(30, 140, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_messy_folder(root) -> str:
    """Two classes of good images in odd modes, plus three bad files in class 'rose'."""
    rose, tulip = os.path.join(root, "rose"), os.path.join(root, "tulip")
    os.makedirs(rose)
    os.makedirs(tulip)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(os.path.join(rose, "good.jpg"))
    Image.new("L", (16, 12), 90).save(os.path.join(rose, "gray.png"))
    Image.new("P", (16, 12), 3).save(os.path.join(tulip, "palette.png"))
    Image.new("RGBA", (16, 12), (0, 0, 200, 128)).save(os.path.join(tulip, "alpha.png"))
    Image.new("CMYK", (16, 12), (0, 255, 0, 0)).save(os.path.join(tulip, "cmyk.jpg"))
    Image.fromarray(np.full((12, 16), 65535, np.uint16)).save(os.path.join(tulip, "deep.png"))
    open(os.path.join(rose, "empty.jpg"), "wb").close()
    with open(os.path.join(rose, "text.png"), "w") as f:
        f.write("this is not an image")
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG")
    with open(os.path.join(rose, "truncated.jpg"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(root)


BAD = {"empty.jpg", "text.png", "truncated.jpg"}


def test_check_images_drops_and_reports_bad_files(tmp_path, caplog):
    ds = load_flower_dataset(DataArguments(train_dir=write_messy_folder(tmp_path / "train"), train_val_split=0.5))
    total = len(ds["train"]) + len(ds["validation"])
    assert total == 9
    with caplog.at_level(logging.WARNING, logger="data_scripts.hygiene"):
        clean, report = check_images(ds, strict=False)
    assert report["num_checked"] == {"train": len(ds["train"]), "validation": len(ds["validation"])}
    assert report["num_skipped"] == 3
    assert {os.path.basename(s["path"]) for s in report["skipped"]} == BAD
    for entry in report["skipped"]:
        original = ds[entry["split"]].cast_column("image", datasets.Image(decode=False))[entry["index"]]
        assert original["image"]["path"] == entry["path"]
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert "0 bytes" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "3 of 9" in caplog.records[-1].getMessage()
    # Every image left decodes, and converts to sensible RGB.
    kept = [to_rgb(row["image"]) for split in clean.values() for row in split]
    assert len(kept) == 6
    colours = sorted(tuple(np.asarray(img)[0, 0]) for img in kept)
    assert (255, 255, 255) in colours  # 16-bit white stays white
    assert (90, 90, 90) in colours


def test_strict_mode_lists_every_bad_file(tmp_path):
    ds = load_flower_dataset(DataArguments(train_dir=write_messy_folder(tmp_path / "train"), train_val_split=0.5))
    with pytest.raises(ValueError) as err:
        check_images(ds, strict=True)
    message = str(err.value)
    assert all(name in message for name in BAD) and "--strict_images" in message
    assert "\n" not in message and message.startswith("3 unusable image(s)")


def test_class_whose_images_are_all_broken_is_named(tmp_path):
    root = tmp_path / "train"
    os.makedirs(root / "rose")
    os.makedirs(root / "tulip")
    for i in range(3):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "rose" / f"{i}.png")
        open(root / "tulip" / f"{i}.jpg", "wb").close()
    ds = load_flower_dataset(DataArguments(train_dir=str(root), validation_dir=str(root)))
    with pytest.raises(ValueError, match=r"class\(es\) \['tulip'\]"):
        check_images(ds, strict=False)


def test_masks_are_checked(tmp_path):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"]), "mask": datasets.Image()}
    )
    image = Image.new("RGB", (10, 8))
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {
                    "image": [image, image, image],
                    "label": [0, 0, 0],
                    "mask": [Image.new("L", (10, 8)), Image.new("L", (8, 8)), None],
                },
                features=features,
            )
        }
    )
    clean, report = check_images(ds)
    assert len(clean["train"]) == 1
    reasons = {s["index"]: s["reason"] for s in report["skipped"]}
    assert reasons[1] == "mask size 8x8 != image size 10x8" and "no mask" in reasons[2]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out" / "data_report.json"
    write_json(path, {"num_skipped": 0})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("{cut off")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"num_skipped": 0}
    assert os.listdir(path.parent) == ["data_report.json"]  # no temporary left behind


def _jpeg_with_orientation(orientation: int) -> bytes:
    """A 4 x 2 JPEG whose left half is red and right half blue, tagged with an EXIF orientation."""
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = (255, 0, 0)
    pixels[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((40, 20), Image.NEAREST).save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_open_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_jpeg_with_orientation(6))  # 6: the camera was turned; viewers rotate 90 degrees clockwise
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (20, 40)  # upright: taller than wide
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red (the stored left half) is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60
    with pytest.raises(ValueError, match="not a readable image"):
        (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
        open_image(tmp_path / "bad.jpg")

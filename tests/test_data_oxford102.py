"""Oxford-102 builder on a tiny fake set written in the official file format."""

import io
import os
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_scripts import DataArguments, check_images, load_flower_dataset
from data_scripts.oxford102 import OXFORD102_CLASS_NAMES, Oxford102, segmentation_to_mask

# image id -> 1-based label; splits as in setid.mat.
LABELS = [1, 2, 3, 1, 2, 3, 1, 2, 3]
TRNID, VALID, TSTID = [1, 2, 3, 4, 5, 6], [7, 8], [9]
# Flower box (top, left, bottom, right) of image id i: shifts with i, so masks differ.
SIZE = (40, 30)  # (width, height)


def flower_box(image_id: int) -> tuple[int, int, int, int]:
    return 5 + image_id % 3, 8 + image_id % 4, 22, 30


def fake_image(image_id: int) -> np.ndarray:
    rng = np.random.default_rng(image_id)
    img = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    img[..., 1] = 120 + rng.integers(0, 30, (SIZE[1], SIZE[0]))  # green background
    top, left, bottom, right = flower_box(image_id)
    img[top:bottom, left:right] = (230, 60 + 20 * (image_id % 9), 90)  # the "flower"
    return img


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_fake_oxford(
    folder,
    image_ids=range(1, 10),
    segmentation_ids=range(1, 10),
    segmentations=True,
    labels=LABELS,
    splits=(TRNID, VALID, TSTID),
):
    os.makedirs(folder, exist_ok=True)
    trnid, valid, tstid = splits
    with tarfile.open(os.path.join(folder, "102flowers.tgz"), "w:gz") as archive:
        for i in image_ids:
            add_member(archive, f"jpg/image_{i:05d}.jpg", jpeg_bytes(fake_image(i)))
    scipy.io.savemat(os.path.join(folder, "imagelabels.mat"), {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(
        os.path.join(folder, "setid.mat"),
        {key: np.array([ids], np.uint16) for key, ids in (("trnid", trnid), ("valid", valid), ("tstid", tstid))},
    )
    if segmentations:
        with tarfile.open(os.path.join(folder, "102segmentations.tgz"), "w:gz") as archive:
            for i in segmentation_ids:
                seg = fake_image(i)
                top, left, bottom, right = flower_box(i)
                inside = np.zeros(seg.shape[:2], bool)
                inside[top:bottom, left:right] = True
                seg[~inside] = (0, 0, 254)
                add_member(archive, f"segmim/segmim_{i:05d}.jpg", jpeg_bytes(seg))
    return str(folder)


def expected_mask(image_id: int) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), bool)
    top, left, bottom, right = flower_box(image_id)
    mask[top:bottom, left:right] = True
    return mask


def test_class_names_are_the_standard_102():
    assert len(OXFORD102_CLASS_NAMES) == 102
    assert OXFORD102_CLASS_NAMES[:3] == ("pink primrose", "hard-leaved pocket orchid", "canterbury bells")
    assert OXFORD102_CLASS_NAMES[-1] == "blackberry lily"
    assert all(name == name.strip() and "?" not in name for name in OXFORD102_CLASS_NAMES)


def test_segmentation_to_mask_tolerates_jpeg_noise():
    seg = np.zeros((60, 60, 3), np.uint8)
    seg[:] = (0, 0, 254)
    seg[15:45, 10:40] = (200, 40, 40)
    seg[25:35, 20:30] = (60, 40, 160)  # a bluish-purple patch is still flower
    decoded = Image.open(io.BytesIO(jpeg_bytes(seg)))
    mask = np.asarray(segmentation_to_mask(decoded)) > 0
    truth = np.zeros((60, 60), bool)
    truth[15:45, 10:40] = True
    assert mask[25:35, 20:30].all()
    assert (mask != truth).mean() < 0.03


def test_official_splits_labels_names_and_masks(tmp_path):
    data_dir = write_fake_oxford(tmp_path / "flowers")
    builder = Oxford102(data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert {s: len(d) for s, d in ds.items()} == {"train": 6, "validation": 2, "test": 1}
    assert ds["train"].features["label"].names == list(OXFORD102_CLASS_NAMES)
    # Labels follow imagelabels.mat (1-based) for the ids of each split.
    for split, ids in (("train", TRNID), ("validation", VALID), ("test", TSTID)):
        assert sorted(ds[split]["label"]) == sorted(LABELS[i - 1] - 1 for i in ids)
    test_row = ds["test"][0]
    assert test_row["label"] == 2 and ds["test"].features["label"].int2str(2) == "canterbury bells"
    assert test_row["image"].size == SIZE
    mask = np.asarray(test_row["mask"]) > 0
    truth = expected_mask(9)
    # JPEG blurs a pixel or so of the edge; a wrong mask would miss by far more.
    assert test_row["mask"].mode == "L" and (mask & truth).sum() / (mask | truth).sum() > 0.8


def test_loads_through_data_arguments_without_segmentations(tmp_path):
    # One training image per class (ids 1..102), then one validation and one test image.
    labels = list(range(1, 103)) + [5, 7]
    data_dir = write_fake_oxford(
        tmp_path / "flowers",
        image_ids=range(1, 105),
        segmentations=False,
        labels=labels,
        splits=(list(range(1, 103)), [103], [104]),
    )
    args = DataArguments(dataset_name="oxford102", data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
    ds = load_flower_dataset(args)
    assert {s: len(d) for s, d in ds.items()} == {"train": 102, "validation": 1, "test": 1}
    assert ds["train"].column_names == ["image", "label"]
    assert ds["validation"][0]["label"] == 4 and ds["test"][0]["label"] == 6


def test_classes_without_training_images_are_named(tmp_path):
    data_dir = write_fake_oxford(tmp_path / "flowers", segmentations=False)  # 3 of the 102 classes
    args = DataArguments(dataset_name="oxford102", data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="No training images for class.*'sweet pea'"):
        load_flower_dataset(args)


@pytest.mark.parametrize("missing", ["102flowers.tgz", "imagelabels.mat", "setid.mat"])
def test_missing_file_is_named_with_download_hint(tmp_path, missing):
    data_dir = write_fake_oxford(tmp_path / "flowers")
    os.remove(os.path.join(data_dir, missing))
    with pytest.raises(FileNotFoundError, match=missing) as err:
        builder = Oxford102(data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
        builder.download_and_prepare()
    assert "robots.ox.ac.uk/~vgg/data/flowers/102" in str(err.value)


def test_image_missing_from_archive_is_named(tmp_path):
    data_dir = write_fake_oxford(tmp_path / "flowers", image_ids=[1, 2, 3, 4, 5, 6, 8, 9])
    builder = Oxford102(data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="image_00007.jpg"):
        builder.download_and_prepare()


def test_missing_segmentation_is_reported_not_fatal(tmp_path):
    data_dir = write_fake_oxford(tmp_path / "flowers", segmentation_ids=[1, 2, 3, 4, 6, 7, 8, 9])
    builder = Oxford102(data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert len(ds["train"]) == 6
    clean, report = check_images(ds, strict=False)
    assert len(clean["train"]) == 5 and report["num_skipped"] == 1
    (skipped,) = report["skipped"]
    assert skipped["split"] == "train" and skipped["path"].endswith("image_00005.jpg")
    assert "no mask" in skipped["reason"]

"""load_flower_dataset on image folders, Hub-layout parquet folders and the synthetic set."""

import os

import datasets
import numpy as np
import pytest
from PIL import Image

from data_scripts import DataArguments, load_flower_dataset


def write_folder(root, counts: dict, size=(12, 10)):
    """root/<class>/<i>.png with a colour per class; returns root as str."""
    for c, (name, n) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (40 * c, 10 * i, 100)).save(os.path.join(root, name, f"{i}.png"))
    return str(root)


def test_train_and_validation_folders(tmp_path):
    train = write_folder(tmp_path / "train", {"rose": 3, "tulip": 2})
    val = write_folder(tmp_path / "val", {"rose": 1, "tulip": 1})
    open(os.path.join(train, "rose", "notes.txt"), "w").write("not an image")
    ds = load_flower_dataset(DataArguments(train_dir=train, validation_dir=val))
    assert sorted(ds) == ["train", "validation"]
    assert ds["train"].features["label"].names == ["rose", "tulip"]
    assert sorted(ds["train"]["label"]) == [0, 0, 0, 1, 1]
    assert ds["validation"]["label"] == [0, 1]
    row = ds["train"][4]
    assert row["label"] == 1 and row["image"].getpixel((0, 0)) == (40, 10, 100)


def test_train_folder_only_gets_a_stratified_validation_split(tmp_path):
    train = write_folder(tmp_path / "train", {"a": 10, "b": 10, "c": 10})
    args = DataArguments(train_dir=train, train_val_split=0.2)
    ds = load_flower_dataset(args)
    assert len(ds["train"]) == 24 and len(ds["validation"]) == 6
    assert np.bincount(ds["validation"]["label"]).tolist() == [2, 2, 2]
    again = load_flower_dataset(args)
    assert [r["image"].getpixel((0, 0)) for r in ds["validation"]] == [
        r["image"].getpixel((0, 0)) for r in again["validation"]
    ]


def test_mismatched_class_names_are_listed(tmp_path):
    train = write_folder(tmp_path / "train", {"rose": 2, "tulip": 2})
    val = write_folder(tmp_path / "val", {"rose": 1, "lily": 1})
    with pytest.raises(ValueError, match=r"Only in validation: \['lily'\]; only in train: \['tulip'\]"):
        load_flower_dataset(DataArguments(train_dir=train, validation_dir=val))


def test_class_folder_without_images_is_named(tmp_path):
    train = write_folder(tmp_path / "train", {"rose": 4, "tulip": 4})
    os.makedirs(os.path.join(train, "lily"))
    with pytest.raises(ValueError, match="lily"):
        load_flower_dataset(DataArguments(train_dir=train))


def test_missing_train_dir_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_dir"):
        load_flower_dataset(DataArguments(train_dir=str(tmp_path / "nope")))


def images_dataset(labels, size=(8, 8)) -> datasets.Dataset:
    images = [Image.new("RGB", size, (i * 20 % 256, 0, 0)) for i in range(len(labels))]
    return datasets.Dataset.from_dict(
        {"img": images, "species": labels, "extra": list(range(len(labels)))},
        features=datasets.Features(
            {"img": datasets.Image(), "species": datasets.Value("string"), "extra": datasets.Value("int64")}
        ),
    )


def write_hub_layout(root, splits: dict) -> str:
    for split, dataset in splits.items():
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        dataset.to_parquet(os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))
    return str(root)


def test_hub_layout_parquet_with_custom_columns(tmp_path):
    root = write_hub_layout(
        tmp_path / "hub",
        {
            "train": images_dataset(["tulip", "rose", "tulip", "rose", "daisy", "daisy"]),
            "test": images_dataset(["rose", "daisy"]),
        },
    )
    args = DataArguments(
        dataset_name=root,
        image_column_name="img",
        label_column_name="species",
        train_val_split=0.5,
        cache_dir=str(tmp_path / "cache"),
    )
    ds = load_flower_dataset(args)
    assert sorted(ds) == ["test", "train", "validation"]
    assert ds["train"].column_names == ["image", "label"]
    # String labels become one ClassLabel for every split, names sorted.
    names = ["daisy", "rose", "tulip"]
    for split in ds:
        assert ds[split].features["label"].names == names
    assert [names[i] for i in ds["test"]["label"]] == ["rose", "daisy"]
    assert len(ds["train"]) == 3 and sorted(ds["validation"]["label"]) == [0, 1, 2]


def test_missing_column_names_the_flag(tmp_path):
    root = write_hub_layout(tmp_path / "hub", {"train": images_dataset(["a", "b"])})
    args = DataArguments(dataset_name=root, label_column_name="species", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"--image_column_name.*'img'"):
        load_flower_dataset(args)
    args = DataArguments(
        dataset_name=root,
        image_column_name="img",
        label_column_name="species",
        mask_column_name="segmentation",
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match="--mask_column_name"):
        load_flower_dataset(args)


def test_synthetic_via_arguments_with_limits(tmp_path):
    args = DataArguments(
        dataset_name="synthetic",
        synthetic_num_classes=3,
        synthetic_image_size=32,
        synthetic_train_per_class=6,
        synthetic_validation_per_class=0,
        synthetic_test_per_class=2,
        train_val_split=0.5,
        max_train_samples=6,
        max_eval_samples=2,
        cache_dir=str(tmp_path),
    )
    ds = load_flower_dataset(args)
    assert {s: len(d) for s, d in ds.items()} == {"train": 6, "validation": 2, "test": 2}
    assert ds["train"].column_names == ["image", "label", "mask"]
    assert ds["train"].features["label"].names == ["black-eyed susan", "star lily", "round poppy"]
    again = load_flower_dataset(args)
    assert ds["train"]["label"] == again["train"]["label"]
    assert np.array_equal(np.asarray(ds["train"][0]["image"]), np.asarray(again["train"][0]["image"]))


def test_max_train_samples_too_small_names_the_missing_class(tmp_path):
    train = write_folder(tmp_path / "train", {"a": 5, "b": 5, "c": 5})
    with pytest.raises(ValueError, match="No training images for class"):
        load_flower_dataset(DataArguments(train_dir=train, train_val_split=0.2, max_train_samples=1))

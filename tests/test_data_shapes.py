"""Synthetic shapes (the pretraining set): determinism, exact masks, no flower classes, builder, config."""

import numpy as np
import pytest
from transformers import HfArgumentParser

from data_scripts import DataArguments, load_flower_dataset
from data_scripts import synthetic_flowers as sf
from data_scripts import synthetic_shapes as ss
from data_scripts.synthetic_shapes import SyntheticShapes, SyntheticShapesConfig, render_example


def tiny_config(**overrides) -> SyntheticShapesConfig:
    params = dict(num_classes=4, image_size=32, train_per_class=3, validation_per_class=1, test_per_class=0)
    params.update(overrides)
    return SyntheticShapesConfig(**params)


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def test_same_seed_same_pixels_different_seed_different():
    config = SyntheticShapesConfig(seed=3)
    a_img, a_mask, a_label = render_example(config, "train", 37)
    b_img, b_mask, b_label = render_example(SyntheticShapesConfig(seed=3), "train", 37)
    c_img, _, c_label = render_example(SyntheticShapesConfig(seed=4), "train", 37)
    assert np.array_equal(pixels(a_img), pixels(b_img))
    assert np.array_equal(pixels(a_mask), pixels(b_mask))
    assert a_label == b_label == c_label == 37 % ss.MAX_CLASSES
    assert not np.array_equal(pixels(a_img), pixels(c_img))
    other_split, _, _ = render_example(config, "validation", 37)
    assert not np.array_equal(pixels(a_img), pixels(other_split))


def test_image_and_mask_format():
    img, mask, _ = render_example(tiny_config(), "validation", 1)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert mask.mode == "L" and mask.size == (32, 32)
    assert set(np.unique(pixels(mask))) == {0, 255}


def to_uint8(x: np.ndarray) -> np.ndarray:
    """A float layer in [0, 1] as the renderer's 8-bit pixels."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def test_mask_is_exactly_where_the_object_is():
    config = SyntheticShapesConfig(train_per_class=2)
    for index in range(2 * ss.MAX_CLASSES):  # every class twice
        img, mask, _ = render_example(config, "train", index)
        spec = ss.sample_spec(config, "train", index)
        background = to_uint8(ss.render_background_layer(config, spec))
        colours, object_mask = ss.render_object_layer(config, spec)
        m = pixels(mask) > 0
        assert np.array_equal(m, object_mask)
        assert np.array_equal(pixels(img)[~m], background[~m].astype(np.int64)), index  # background untouched
        assert np.array_equal(pixels(img)[m], to_uint8(colours)[m].astype(np.int64)), index  # object only
        assert 0.01 < m.mean() < 0.7, index
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), index  # inside the image


def test_disk_mask_matches_the_analytic_circle_and_ring_has_a_hole():
    config = SyntheticShapesConfig(train_per_class=3)
    disk, ring = ss.class_names().index("disk"), ss.class_names().index("ring")
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    for index in (disk, disk + ss.MAX_CLASSES):
        _, mask, _ = render_example(config, "train", index)
        spec = ss.sample_spec(config, "train", index)
        distance = np.hypot(yy - spec.centre_yx[0], xx - spec.centre_yx[1])
        m = pixels(mask) > 0
        assert m[distance < spec.radius - 1].all() and not m[distance > spec.radius + 1].any()
    for index in (ring, ring + ss.MAX_CLASSES):
        img, mask, _ = render_example(config, "train", index)
        spec = ss.sample_spec(config, "train", index)
        cy, cx = (int(v) for v in spec.centre_yx)
        background = to_uint8(ss.render_background_layer(config, spec))
        assert pixels(mask)[cy, cx] == 0  # the hole shows the background
        assert np.array_equal(pixels(img)[cy, cx], background[cy, cx])


def test_class_names_are_unique_and_disjoint_from_the_flowers():
    names = ss.class_names()
    assert len(names) == len(set(names)) == ss.MAX_CLASSES >= 20
    flower_names = set(sf.class_names(sf.MAX_CLASSES))
    assert not set(names) & flower_names
    flower_words = {word for name in flower_names for word in name.split()} | {"flower", "petal", "star", "daisy"}
    assert not {word for name in names for word in name.lower().split()} & flower_words


def test_texture_classes_show_two_colours_and_shape_classes_one_outline():
    config = SyntheticShapesConfig(train_per_class=2)
    striped = ss.class_names().index("striped blob")
    img, mask, _ = render_example(config, "train", striped)
    spec = ss.sample_spec(config, "train", striped)
    inside = pixels(img)[pixels(mask) > 0]
    primary, secondary = (np.asarray(c) * 255 for c in (spec.primary_rgb, spec.secondary_rgb))
    near_primary = np.abs(inside - primary).max(-1) < np.abs(inside - secondary).max(-1)
    assert spec.fill == "stripes"
    assert 0.2 < near_primary.mean() < 0.8  # both colours cover a good share of the blob
    fills = {ss.sample_spec(config, "train", i).fill for i in range(ss.MAX_CLASSES) if ss.CLASSES[i][2] == "any"}
    assert fills <= {"flat", "shaded"}


def test_first_colour_hue_lies_in_the_class_range_and_ranges_overlap():
    import colorsys

    config = SyntheticShapesConfig(train_per_class=4)
    for index in range(4 * ss.MAX_CLASSES):
        spec = ss.sample_spec(config, "train", index)
        if spec.fill in ss.TEXTURES:  # the two colours may be swapped in a texture
            continue
        lo, hi = ss.hue_range(spec.label)
        hue = colorsys.rgb_to_hsv(*spec.primary_rgb)[0]
        assert (hue - lo) % 1.0 <= hi - lo + 1e-9, (index, hue, lo, hi)
    centres = sorted((sum(ss.hue_range(c)) / 2) % 1.0 for c in range(ss.MAX_CLASSES))
    gaps = np.diff(centres + [centres[0] + 1])
    assert gaps.max() < ss.HUE_RANGE_WIDTH / 2  # neighbours share hues: colour alone is not enough
    assert len(set(np.round(centres, 6))) == ss.MAX_CLASSES


def test_builder_matches_renderer_balanced_and_cached(tmp_path):
    config = tiny_config()
    builder = SyntheticShapes(config=config, cache_dir=str(tmp_path))
    builder.download_and_prepare(num_proc=2)
    ds = builder.as_dataset()
    assert sorted(ds) == ["train", "validation"]  # test_per_class=0: no test split
    assert [len(ds["train"]), len(ds["validation"])] == [12, 4]
    assert ds["train"].features["label"].names == ss.class_names(4)
    assert np.bincount(ds["train"]["label"]).tolist() == [3, 3, 3, 3]
    for index in (0, 7, 11):
        row = ds["train"][index]
        img, mask, label = render_example(config, "train", index)
        assert row["label"] == label
        assert np.array_equal(pixels(row["image"]), pixels(img))
        assert np.array_equal(pixels(row["mask"]), pixels(mask))
    again = SyntheticShapes(config=tiny_config(), cache_dir=str(tmp_path))
    assert again.cache_dir == builder.cache_dir
    for changed in (dict(seed=1), dict(num_classes=5), dict(image_size=40), dict(train_per_class=4)):
        other = SyntheticShapes(config=tiny_config(**changed), cache_dir=str(tmp_path))
        assert other.cache_dir != builder.cache_dir, changed


def test_config_validation():
    for kwargs, message in [
        (dict(num_classes=ss.MAX_CLASSES + 1), "num_classes"),
        (dict(num_classes=1), "num_classes"),
        (dict(image_size=8), "image_size"),
        (dict(train_per_class=0), "train_per_class"),
        (dict(test_per_class=-1), "test_per_class"),
        (dict(seed=-1), "seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            SyntheticShapesConfig(**kwargs)
    with pytest.raises(ValueError, match="out of range"):
        render_example(tiny_config(), "train", 12)
    with pytest.raises(ValueError, match="split"):
        render_example(tiny_config(), "dev", 0)


def test_load_flower_dataset_reads_the_shapes(tmp_path):
    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--dataset_name", "synthetic_shapes", "--synthetic_num_classes", "3", "--synthetic_image_size", "32",
        "--synthetic_train_per_class", "2", "--synthetic_validation_per_class", "1",
        "--synthetic_test_per_class", "1", "--synthetic_seed", "5", "--cache_dir", str(tmp_path),
    ])
    ds = load_flower_dataset(args)
    assert {split: len(d) for split, d in ds.items()} == {"train": 6, "validation": 3, "test": 3}
    assert ds["train"].features["label"].names == ss.class_names(3)
    assert ds["train"].column_names == ["image", "label", "mask"]
    expected, _, _ = render_example(tiny_config(num_classes=3, seed=5, test_per_class=1), "test", 2)
    assert np.array_equal(pixels(ds["test"][2]["image"]), pixels(expected))


def test_data_arguments_check_the_class_count_per_dataset():
    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(["--dataset_name", "synthetic_shapes", "--synthetic_num_classes", "20"])
    assert args.synthetic_num_classes == 20
    for argv, flag in [
        (["--dataset_name", "synthetic_shapes", "--synthetic_num_classes", str(ss.MAX_CLASSES + 1)],
         "--synthetic_num_classes"),
        (["--synthetic_num_classes", "20"], "--synthetic_num_classes"),  # flowers: 2..6
        (["--dataset_name", "synthetic_shapes", "--synthetic_background", "correlated"], "--synthetic_background"),
    ]:
        with pytest.raises(ValueError, match=flag):
            parser.parse_args_into_dataclasses(argv)

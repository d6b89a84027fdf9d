"""Synthetic flowers: determinism, masks, variants, background modes, builder and cache."""

import numpy as np
import pytest
from transformers import HfArgumentParser

from data_scripts import (
    DataArguments,
    SyntheticFlowers,
    SyntheticFlowersConfig,
    load_flower_dataset,
    render_example,
    render_variant,
)
from data_scripts import synthetic_flowers as sf


def tiny_config(**overrides) -> SyntheticFlowersConfig:
    params = dict(num_classes=3, image_size=32, train_per_class=4, validation_per_class=2, test_per_class=2)
    params.update(overrides)
    return SyntheticFlowersConfig(**params)


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def test_same_seed_same_pixels_different_seed_different():
    a_img, a_mask, a_label = render_example(tiny_config(seed=3), "train", 5)
    b_img, b_mask, b_label = render_example(tiny_config(seed=3), "train", 5)
    c_img, _, c_label = render_example(tiny_config(seed=4), "train", 5)
    assert np.array_equal(pixels(a_img), pixels(b_img))
    assert np.array_equal(pixels(a_mask), pixels(b_mask))
    assert a_label == b_label == c_label == 5 % 3
    assert not np.array_equal(pixels(a_img), pixels(c_img))


def test_examples_of_different_splits_differ():
    train, _, _ = render_example(tiny_config(), "train", 0)
    test, _, _ = render_example(tiny_config(), "test", 0)
    assert not np.array_equal(pixels(train), pixels(test))


def test_image_and_mask_format():
    img, mask, _ = render_example(tiny_config(), "validation", 1)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert mask.mode == "L" and mask.size == (32, 32)
    assert set(np.unique(pixels(mask))) <= {0, 255}


def test_flower_inside_image_and_size_in_range():
    config = tiny_config(image_size=48, train_per_class=10)
    areas = []
    for index in range(30):
        _, mask, _ = render_example(config, "train", index)
        m = pixels(mask) > 0
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), index
        areas.append(m.mean())
    assert 0.12 < min(areas) and max(areas) < 0.55
    assert 0.2 < float(np.mean(areas)) < 0.45


def test_mask_is_exactly_where_flower_replaces_background():
    config = tiny_config()
    for index in range(6):
        img, mask, _ = render_example(config, "train", index)
        bg, bg_mask = render_variant(config, "train", index, "only_bg_t")
        m = pixels(mask) > 0
        changed = (pixels(img) != pixels(bg)).any(-1)
        assert np.array_equal(pixels(bg_mask), pixels(mask))
        assert not changed[~m].any()  # outside the mask: background untouched
        assert changed[m].mean() > 0.9  # inside: the flower (a pixel may match by chance)


def test_variants_are_exact_compositions():
    config = tiny_config()
    index, partner = 1, 4
    original, mask = render_variant(config, "train", index, "original")
    m = pixels(mask) > 0
    only_fg, _ = render_variant(config, "train", index, "only_fg")
    no_fg, _ = render_variant(config, "train", index, "no_fg")
    partner_bg, _ = render_variant(config, "train", partner, "only_bg_t")
    mixed, mixed_mask = render_variant(config, "train", index, "mixed_rand", partner_index=partner)
    same, _ = render_variant(config, "train", index, "mixed_same", partner_index=partner)

    assert np.array_equal(pixels(original), pixels(render_example(config, "train", index)[0]))
    assert (pixels(only_fg)[~m] == 0).all() and np.array_equal(pixels(only_fg)[m], pixels(original)[m])
    assert (pixels(no_fg)[m] == 0).all() and np.array_equal(pixels(no_fg)[~m], pixels(original)[~m])
    assert np.array_equal(pixels(mixed_mask), pixels(mask))
    assert np.array_equal(pixels(mixed)[m], pixels(original)[m])
    assert np.array_equal(pixels(mixed)[~m], pixels(partner_bg)[~m])
    assert np.array_equal(pixels(same), pixels(mixed))  # the caller picks the partner; same rendering
    assert not np.array_equal(pixels(mixed)[~m], pixels(original)[~m])


def test_variant_argument_errors():
    config = tiny_config()
    with pytest.raises(ValueError, match="variant"):
        render_variant(config, "train", 0, "only_flower")
    with pytest.raises(ValueError, match="partner_index"):
        render_variant(config, "train", 0, "mixed_same")
    with pytest.raises(ValueError, match="partner_index"):
        render_variant(config, "train", 0, "no_fg", partner_index=1)
    with pytest.raises(ValueError, match="out of range"):
        render_example(config, "train", 12)
    with pytest.raises(ValueError, match="split"):
        render_example(config, "dev", 0)


@pytest.mark.parametrize("correlation", [0.9, 0.5])
def test_correlated_backgrounds_have_the_configured_share(correlation):
    config = SyntheticFlowersConfig(
        num_classes=5, train_per_class=100, background="correlated", bg_correlation=correlation
    )
    specs = [sf.sample_spec(config, "train", i) for i in range(500)]
    share = np.mean([s.background_family == s.label for s in specs])
    # Binomial(500, p): 4 standard deviations is < 0.09.
    assert abs(share - correlation) < 0.09
    others = [s.background_family for s in specs if s.background_family != s.label]
    assert set(others) == set(range(5))  # the off-class draws cover the other families


def test_random_backgrounds_are_independent_of_class():
    config = SyntheticFlowersConfig(num_classes=5, train_per_class=100, background="random")
    specs = [sf.sample_spec(config, "train", i) for i in range(500)]
    share = np.mean([s.background_family == s.label for s in specs])
    assert abs(share - 1 / 5) < 0.08
    families = np.bincount([s.background_family for s in specs], minlength=5)
    assert families.min() > 60  # each of the 5 families ~100 times


def test_hue_ranges_overlap_a_third_with_neighbours():
    for num_classes in (2, 5, 6):
        ranges = [sf.hue_range_deg(c, num_classes) for c in range(num_classes)]
        for (lo_a, hi_a), (lo_b, hi_b) in zip(ranges, ranges[1:]):
            width = hi_a - lo_a
            assert hi_a - lo_b == pytest.approx(width / 3)
            assert hi_b - lo_b == pytest.approx(width)


def test_species_differ_in_shape():
    signatures = {(s.num_petals, s.petal_shape) for s in sf.SPECIES}
    assert len(signatures) == len(sf.SPECIES)
    assert len(sf.BACKGROUND_FAMILIES) == sf.MAX_CLASSES


def test_builder_matches_renderer_balanced_and_cached(tmp_path, monkeypatch):
    config = tiny_config()
    builder = SyntheticFlowers(config=config, cache_dir=str(tmp_path))
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert sorted(ds) == ["test", "train", "validation"]
    assert [len(ds[s]) for s in ("train", "validation", "test")] == [12, 6, 6]
    assert ds["train"].features["label"].names == sf.class_names(3)
    assert np.bincount(ds["train"]["label"]).tolist() == [4, 4, 4]
    row = ds["validation"][3]
    img, mask, label = render_example(config, "validation", 3)
    assert row["label"] == label
    assert np.array_equal(pixels(row["image"]), pixels(img))
    assert np.array_equal(pixels(row["mask"]), pixels(mask))

    # Same parameters: same cache entry, nothing re-rendered.
    def no_rendering(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(sf, "render_example", no_rendering)
    again = SyntheticFlowers(config=tiny_config(), cache_dir=str(tmp_path))
    assert again.cache_dir == builder.cache_dir
    again.download_and_prepare()
    assert len(again.as_dataset()["train"]) == 12
    # Different parameters: different cache entries.
    for changed in (dict(seed=1), dict(background="correlated"), dict(image_size=40), dict(test_per_class=3)):
        other = SyntheticFlowers(config=tiny_config(**changed), cache_dir=str(tmp_path))
        assert other.cache_dir != builder.cache_dir, changed


def test_parallel_rendering_gives_the_same_set(tmp_path):
    """--preprocessing_num_workers 2 renders the shards in two processes: same examples, same order."""
    sets = []
    for workers in (1, 2):
        args = DataArguments(synthetic_num_classes=3, synthetic_train_per_class=6, synthetic_validation_per_class=2,
                             synthetic_test_per_class=2, preprocessing_num_workers=workers,
                             cache_dir=str(tmp_path / str(workers)))
        assert args.synthetic_num_proc() == (None if workers == 1 else 2)
        sets.append(load_flower_dataset(args))
    for split in ("train", "validation", "test"):
        assert sets[0][split]["label"] == sets[1][split]["label"]
        for row in (0, len(sets[0][split]) - 1):
            assert np.array_equal(pixels(sets[0][split][row]["image"]), pixels(sets[1][split][row]["image"]))


def test_builder_skips_empty_splits(tmp_path):
    builder = SyntheticFlowers(config=tiny_config(test_per_class=0), cache_dir=str(tmp_path))
    builder.download_and_prepare()
    assert sorted(builder.as_dataset()) == ["train", "validation"]


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticFlowersConfig(num_classes=sf.MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="background"):
        SyntheticFlowersConfig(background="striped")


def test_data_arguments_parse_and_validate():
    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(["--dataset", "synthetic", "--synthetic_background", "correlated"])
    assert args.dataset_name == "synthetic" and args.synthetic_background == "correlated"
    for argv, flag in [
        (["--synthetic_background", "plain"], "--synthetic_background"),
        (["--synthetic_num_classes", "1"], "--synthetic_num_classes"),
        (["--train_val_split", "1.5"], "--train_val_split"),
        (["--max_train_samples", "0"], "--max_train_samples"),
        (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers"),
        (["--synthetic_bg_correlation", "2"], "--synthetic_bg_correlation"),
        (["--dataset_name", "oxford102"], "--data_dir"),
        (["--validation_dir", "v"], "--train_dir"),
    ]:
        with pytest.raises(ValueError, match=flag):
            parser.parse_args_into_dataclasses(argv)

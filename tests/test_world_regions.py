"""Per-region judging (studio/world/regions.py) against two-object renders whose ground truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.assets import assets_root
from studio.world.concepts import Scene
from studio.world.regions import (
    HALVES,
    box_pixels,
    judge_regions,
    pair_accuracy,
    pair_scenes,
    placement,
    region_view,
)
from studio.world.render import render, render_pair


@pytest.fixture(scope="module")
def judge():
    folder = assets_root() / "judges" / "concept-judge"
    if not (folder / "judge.safetensors").is_file():
        pytest.skip("the shipped concept judge is not in this checkout")
    from studio.world.judge import load_judge

    return load_judge(folder)


@pytest.fixture(scope="module")
def pairs_and_images():
    rng = np.random.default_rng(14)
    pairs = pair_scenes(40, rng)
    return pairs, [render_pair(left, right, rng) for left, right in pairs]


def test_region_judge_reads_each_half(judge, pairs_and_images):
    pairs, images = pairs_and_images
    accuracy = pair_accuracy(judge, images, pairs)
    assert min(accuracy.values()) >= 0.9, accuracy
    # the verdict really belongs to its half: read against the *other* half's scene, shapes and colours fail
    swapped = pair_accuracy(judge, images, [(right, left) for left, right in pairs])
    for attribute in ("shape", "color"):
        differ = np.mean([left.value(attribute) != right.value(attribute) for left, right in pairs])
        assert swapped[attribute] <= 1 - differ + 0.1, (attribute, swapped)


def test_zoomed_view_is_worse_than_native_scale(judge, pairs_and_images):
    """Scaling a half up changes the shape's size and texture period, which the judge reads at one scale."""
    pairs, images = pairs_and_images
    native, zoom = pair_accuracy(judge, images, pairs), pair_accuracy(judge, images, pairs, view="zoom")
    assert zoom["shape"] < native["shape"] - 0.2


def test_region_view_of_the_whole_image_is_the_image(pairs_and_images):
    image = pairs_and_images[1][0]
    assert np.array_equal(region_view(image, (0.0, 0.0, 1.0, 1.0)), image)
    half = region_view(image, HALVES["left"])
    assert half.shape == (64, 64, 3)
    assert np.array_equal(half[:, 16:48], image[:, :32])  # native scale, centred
    assert np.array_equal(half[:, 0], image[:, 0]) and np.array_equal(half[:, 63], image[:, 31])  # edge repeated


def test_judge_regions_uint8_and_pil_agree(judge, pairs_and_images):
    from PIL import Image

    image = pairs_and_images[1][1]
    as_uint8 = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    a = judge_regions(judge, [as_uint8])[0]
    b = judge_regions(judge, [Image.fromarray(as_uint8)])[0]
    assert a == b and set(a) == {"left", "right"}


def test_placement_inside_none_and_crossing():
    rng = np.random.default_rng(3)
    kw = dict(color="red", texture="solid", background="light", size="small")
    pair = render_pair(Scene("zorb", position="left", **kw), Scene("quix", position="right", **kw), rng)
    assert [placement(pair, HALVES[s]) for s in ("left", "right")] == ["inside", "inside"]
    left_only = render(Scene("square", position="left", **kw), rng)
    assert [placement(left_only, HALVES[s]) for s in ("left", "right")] == ["inside", "none"]
    centred = render(Scene("circle", position="center", **kw), rng)  # one shape across the middle
    assert [placement(centred, HALVES[s]) for s in ("left", "right")] == ["crossing", "crossing"]
    wide = pair.copy()
    wide[24:40, 10:54] = (0.86, 0.16, 0.14)  # a bar across the middle, centred in each half
    assert [placement(wide, HALVES[s]) for s in ("left", "right")] == ["crossing", "crossing"]
    waves = render_pair(Scene("zorb", position="left", **{**kw, "background": "waves"}),
                        Scene("quix", position="right", **{**kw, "background": "waves"}), rng)
    assert placement(waves, HALVES["left"]) == "unknown"  # a textured background: the pixel test cannot tell


def test_bad_boxes_and_scenes_are_refused():
    with pytest.raises(ValueError, match="must satisfy"):
        box_pixels((0.5, 0.0, 0.4, 1.0), 64, 64)
    with pytest.raises(ValueError, match="must satisfy"):
        box_pixels((0.0, 0.0, 1.2, 1.0), 64, 64)
    with pytest.raises(ValueError, match="under 4 pixels"):
        box_pixels((0.0, 0.0, 0.01, 1.0), 64, 64)
    with pytest.raises(ValueError, match="unknown region view"):
        region_view(np.zeros((64, 64, 3), np.float32), HALVES["left"], view="stretch")
    rng = np.random.default_rng(0)
    small = dict(color="red", texture="solid", size="small")
    with pytest.raises(ValueError, match="one background"):
        render_pair(Scene("zorb", background="light", position="left", **small),
                    Scene("quix", background="dark", position="right", **small), rng)
    with pytest.raises(ValueError, match="only 'small' shapes"):
        render_pair(Scene("zorb", "red", "solid", "light", "large", "left"),
                    Scene("quix", "red", "solid", "light", "small", "right"), rng)

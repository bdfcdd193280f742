"""The deterministic shapes evaluator: its own accuracy on real dataset images, its robustness, and that it is a
real judge (it disagrees with wrong prompts)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm_core.data.synthetic import COMBINATIONS, SIZES, ShapeSpec, render_shape, shape_caption, write_shapes_source
from ldm_core.evaluation.attributes import (
    accuracy_metrics,
    attribute_accuracy,
    evaluator_accuracy,
    parse_caption,
    predict_attributes,
    template_coverage,
)

N_REAL = 324  # 1.5 balanced blocks of the 216 combinations


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> tuple[np.ndarray, list[dict]]:
    """Held-out images exactly as the dataset source writes them (PNG files + metadata.jsonl), seeded."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_source(str(root), N_REAL, seed=2024)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(Path(root) / r["file_name"]).convert("RGB")) for r in rows])
    attributes = [{k: r[k] for k in ("color", "shape", "size", "position")} for r in rows]
    return images, attributes


def test_evaluator_is_at_least_98_percent_right_on_real_dataset_images(real_images):
    images, attributes = real_images
    result = evaluator_accuracy(images, attributes)
    assert result["n"] == N_REAL and result["n_color"] == result["n_shape"] == N_REAL
    assert result["color_acc"] >= 0.98 and result["shape_acc"] >= 0.98, result["errors"][:10]
    # size and position come from the same template match; they must be as reliable
    assert result["size_acc"] >= 0.98 and result["position_acc"] >= 0.98, result["errors"][:10]
    # the errors list is exactly the misses the accuracies count
    misses = {a: sum(e[1] == a for e in result["errors"]) for a in ("color", "shape", "size", "position")}
    for a, k in misses.items():
        assert result[f"{a}_acc"] == pytest.approx(1 - k / N_REAL)


def test_evaluator_survives_blur_and_noise_like_a_decoder_leaves(real_images):
    # A trained autoencoder blurs edges and adds noise; the judge must not blame the model for that.
    images, attributes = real_images
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(images[:108].astype(float), sigma=(0, 1.0, 1.0, 0))
    noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
    result = attribute_accuracy(noisy, attributes[:108])
    assert result["color_acc"] >= 0.98 and result["shape_acc"] >= 0.95


def test_evaluator_works_at_other_image_sizes():
    specs = [ShapeSpec(*c) for c in COMBINATIONS[::5]]  # 44 combinations spanning every attribute
    images = np.stack([np.asarray(render_shape(s, 64)) for s in specs])
    result = evaluator_accuracy(images, [s.attributes for s in specs])
    assert result["errors"] == []


def test_evaluator_disagrees_with_wrong_prompts(real_images):
    # Shift every prompt by one image: the attributes no longer describe the pictures. A judge that always agreed
    # would still score 100%; this one must fall to about chance (1/4 colours, 1/3 shapes).
    images, attributes = real_images
    shifted = attributes[1:] + attributes[:1]
    result = attribute_accuracy(images, shifted)
    assert result["color_acc"] < 0.45 and result["shape_acc"] < 0.55


def test_blank_and_background_only_images_predict_nothing_and_score_zero():
    blank = np.full((2, 32, 32, 3), 240, np.uint8)
    blank[1, 10:12, 10:12] = 236  # a faint smudge is not a shape
    prediction = predict_attributes(blank[0])
    assert (prediction.color, prediction.shape, prediction.size, prediction.position) == (None,) * 4
    result = attribute_accuracy(blank, ["a small red circle in the center", "a large blue square on the left"])
    assert result["color_acc"] == 0 and result["shape_acc"] == 0 and result["n"] == 2


def test_a_stray_speck_does_not_move_the_verdict():
    spec = ShapeSpec("triangle", "blue", "small", "top right")
    image = np.asarray(render_shape(spec, 32)).copy()
    image[28:30, 2:4] = (220, 40, 40)  # a 2×2 red speck in the bottom-left corner
    p = predict_attributes(image)
    assert (p.color, p.shape, p.size, p.position) == ("blue", "triangle", "small", "top right")


def test_template_coverage_has_the_closed_form_areas():
    side = 16.0  # at 32 px, centred on a pixel corner so the square is exact
    square = template_coverage("square", (16.0, 16.0), side, 32, 32)
    circle = template_coverage("circle", (16.0, 16.0), side, 32, 32)
    triangle = template_coverage("triangle", (16.0, 16.0), side, 32, 32)
    assert square.sum() == pytest.approx(side**2)
    assert circle.sum() == pytest.approx(math.pi / 4 * side**2, rel=0.01)
    assert triangle.sum() == pytest.approx(side**2 / 2, rel=0.02)
    # the triangle points up: its lower half holds 3/4 of its area
    assert triangle[16:].sum() / triangle.sum() == pytest.approx(0.75, rel=0.02)


def test_parse_caption_inverts_the_dataset_caption_for_every_combination():
    for shape, color, size, position in COMBINATIONS:
        assert parse_caption(shape_caption(shape, color, size, position)) == {
            "color": color,
            "shape": shape,
            "size": size,
            "position": position,
        }
    with pytest.raises(ValueError, match="not a shapes-dataset caption"):
        parse_caption("a photo of a cat")


def test_partial_prompts_count_only_the_attributes_they_name():
    images = np.stack([np.asarray(render_shape(ShapeSpec("circle", "red", "large", "center"), 32))] * 3)
    result = attribute_accuracy(images, [{"color": "red"}, {"color": "blue"}, {"shape": "circle"}])
    assert result["n"] == 3 and result["n_color"] == 2 and result["n_shape"] == 1 and result["n_position"] == 0
    assert result["color_acc"] == 0.5 and result["shape_acc"] == 1.0 and result["position_acc"] is None
    metrics = accuracy_metrics(result)
    assert metrics["color_acc"].value == 0.5 and metrics["color_acc"].n == 2
    assert not metrics["position_acc"].computed and "position" in metrics["position_acc"].reason


def test_sizes_vocabulary_is_what_the_templates_use():
    # the evaluator reads the generator's geometry; if a size is added there, it is judged here without edits
    for size in SIZES:
        p = predict_attributes(np.asarray(render_shape(ShapeSpec("square", "green", size, "bottom"), 48)))
        assert p.size == size and p.shape == "square" and p.position == "bottom"

"""Manifest-driven preprocessing reproduces MedMNIST's making (centre crop, area resize)."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import ManifestError
from appliance.imaging.preprocess import CropBox, preprocess, validate_steps

MEDMNIST = [
    {"op": "center_crop_square"},
    {"op": "resize", "size": [28, 28], "interpolation": "area"},
    {"op": "normalize", "scale": 255.0, "mean": 0.5, "std": 0.5},
]
SHAPE = [1, 1, 28, 28]


def test_28x28_images_pass_bit_exact() -> None:
    img = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.float32)
    out = preprocess(img, MEDMNIST, SHAPE)
    assert out.tensor.shape == (1, 1, 28, 28) and out.tensor.dtype == np.float32
    np.testing.assert_array_equal(out.tensor[0, 0], (img / 255.0 - 0.5) / 0.5)
    assert out.crop == CropBox(0, 0, 28, 28)


def test_full_resolution_goes_through_the_same_transform() -> None:
    # A 28×28 "training" image blown up 20× into a 560×560 square and framed by a border
    # (non-square, like a radiograph): crop + area resize must give the original back exactly.
    small = np.random.default_rng(2).integers(0, 256, (28, 28)).astype(np.float32)
    big = np.kron(small, np.ones((20, 20), dtype=np.float32))
    framed = np.zeros((560, 700), dtype=np.float32)
    framed[:, 70:630] = big
    out = preprocess(framed, MEDMNIST, SHAPE)
    assert out.crop == CropBox(70, 0, 560, 560)
    np.testing.assert_allclose(out.tensor[0, 0], (small / 255.0 - 0.5) / 0.5, atol=1e-5)


def test_portrait_crop_is_centred() -> None:
    img = np.zeros((101, 60), dtype=np.float32)
    out = preprocess(img, MEDMNIST, SHAPE)
    assert out.crop == CropBox(0, 20, 60, 60)


def test_clahe_and_three_channels() -> None:
    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(100, 10, (64, 64)), 0, 255).astype(np.float32)
    steps = [{"op": "clahe", "clip_limit": 2.0, "tile_grid": [4, 4]},
             {"op": "resize", "size": [28, 28], "interpolation": "linear"}]
    out = preprocess(img, steps, [1, 3, 28, 28])
    assert out.tensor.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(out.tensor[0, 0], out.tensor[0, 2])
    assert out.tensor.std() > img.std() * 1.5  # contrast was stretched


@pytest.mark.parametrize("steps,message", [
    ([{"op": "sharpen"}], "unknown op 'sharpen'"),
    ([{"op": "resize", "size": [28]}], "size must be"),
    ([{"op": "resize", "size": [28, 28], "interpolation": "lanczos9"}], "unknown interpolation"),
])
def test_bad_steps_are_refused(steps: list, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        validate_steps(steps)


def test_output_size_must_match_the_model_input() -> None:
    with pytest.raises(ManifestError, match="model input is 28×28"):
        preprocess(np.zeros((40, 40), np.float32), [{"op": "resize", "size": [32, 32]}], SHAPE)

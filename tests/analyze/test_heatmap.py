"""CAM -> overlay at the source resolution, placed over the centre-cropped square."""
from __future__ import annotations

import numpy as np

from appliance.analyze.heatmap import cam_to_source, normalise_cam, overlay
from appliance.imaging.preprocess import CropBox


def test_overlay_shape_and_untouched_outside_the_crop() -> None:
    source = np.full((300, 500), 100.0, dtype=np.float32)
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[3, 3] = 5.0
    crop = CropBox(100, 0, 300, 300)
    out = overlay(source, cam, crop)
    assert out.shape == (300, 500, 3) and out.dtype == np.uint8
    # Left and right of the crop the source shows through unchanged.
    assert (out[:, :100] == 100).all() and (out[:, 400:] == 100).all()
    # The hot cell lands at the centre of the cropped square and is tinted (red-ish under JET).
    centre = out[150, 250].astype(int)
    assert centre[0] > 110 and centre[0] > centre[1] and centre[0] > centre[2]


def test_cam_maps_to_the_right_place() -> None:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[0, 6] = 1.0  # top-right cell
    full = cam_to_source(cam, CropBox(50, 20, 70, 70), (110, 170))
    y, x = np.unravel_index(np.argmax(full), full.shape)
    assert 20 <= y < 40 and 100 <= x < 120
    assert full[:20].max() == 0 and full[:, :50].max() == 0


def test_colour_source_and_degenerate_maps() -> None:
    source = np.zeros((40, 40, 3), dtype=np.float32)
    source[..., 1] = 200
    out = overlay(source, np.zeros((7, 7)), None)
    np.testing.assert_array_equal(out[..., 1], 200)  # an all-zero map changes nothing
    assert normalise_cam(np.full((7, 7), np.nan)).max() == 0
    assert normalise_cam(np.array([[-1.0, 2.0]])).tolist() == [[0.0, 1.0]]

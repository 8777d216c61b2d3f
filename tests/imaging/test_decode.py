"""Decode of real DICOM samples (pydicom + pydicom-data) in every transfer syntax we accept."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from appliance.errors import DecodeError
from appliance.imaging.decode import decode, decode_file, to_grey

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def sample(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"test file {name} missing (pydicom-data==1.0.0 must be installed)"
    return str(path)


# name, transfer syntax (for the record), shape, is_colour, frames
SAMPLES = [
    ("RG1_UNCR.dcm", "explicit LE", (1955, 1841), False, 1),
    ("RG1_J2KR.dcm", "JPEG 2000 lossless", (1955, 1841), False, 1),
    ("RG1_J2KI.dcm", "JPEG 2000 lossy", (1955, 1841), False, 1),
    ("RG3_UNCR.dcm", "explicit LE", (1760, 1760), False, 1),
    ("CT_small.dcm", "explicit LE", (128, 128), False, 1),
    ("MR_small_implicit.dcm", "implicit LE", (64, 64), False, 1),
    ("MR_small_bigendian.dcm", "explicit BE", (64, 64), False, 1),
    ("image_dfl.dcm", "deflated explicit LE", (512, 512), False, 1),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline", (100, 100, 3), True, 1),
    ("JPGExtended.dcm", "JPEG extended 12-bit", (1024, 256), False, 1),
    ("JPEG-LL.dcm", "JPEG lossless P14", (1024, 256), False, 1),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG lossless SV1", (768, 1024), False, 1),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless", (64, 64), False, 1),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS near-lossless", (50, 10), False, 1),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless", (64, 64), False, 1),
    ("MR2_J2KI.dcm", "JPEG 2000 lossy", (1024, 1024), False, 1),
    ("MR_small_RLE.dcm", "RLE", (64, 64), False, 1),
    ("OBXXXX1A_rle.dcm", "RLE palette US", (600, 800, 3), True, 1),
    ("OBXXXX1A_expb_2frame.dcm", "explicit BE palette US", (600, 800, 3), True, 2),
    ("US1_J2KR.dcm", "JPEG 2000 lossless YBR_RCT US", (480, 640, 3), True, 1),
    ("US1_UNCR.dcm", "explicit LE RGB US", (480, 640, 3), True, 1),
    ("color3d_jpeg_baseline.dcm", "JPEG baseline 120-frame US", (480, 640, 3), True, 120),
    ("examples_ybr_color.dcm", "JPEG baseline 30-frame YBR US", (240, 320, 3), True, 30),
    ("examples_palette.dcm", "palette US", (350, 800, 3), True, 1),
    ("examples_rgb_color.dcm", "RGB US", (240, 320, 3), True, 1),
    ("emri_small_jpeg_ls_lossless.dcm", "JPEG-LS multi-frame", (64, 64), False, 10),
    ("SC_rgb_rle_16bit.dcm", "RLE 16-bit RGB", (100, 100, 3), True, 1),
]


@pytest.mark.parametrize("name,syntax,shape,colour,frames", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_decodes_real_sample(name: str, syntax: str, shape: tuple, colour: bool, frames: int) -> None:
    image = decode_file(sample(name))
    assert image.pixels.shape == shape, syntax
    assert image.pixels.dtype == np.float32
    assert image.is_colour is colour
    assert image.frames == frames
    assert image.frame_index == frames // 2  # documented rule: the middle frame
    assert 0.0 <= float(image.pixels.min()) and float(image.pixels.max()) <= 255.0
    assert float(image.pixels.std()) > 5.0, "decoded image should not be flat"
    assert image.source_kind == "dicom"


@pytest.mark.parametrize("lossless,reference,atol", [
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm", 1e-3),
    ("MR_small_RLE.dcm", "MR_small.dcm", 1e-3),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 1e-3),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 1e-3),
    ("MR_small_bigendian.dcm", "MR_small.dcm", 1e-3),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", 1e-3),
    # The big-endian copy stores its palette as 8-bit entries in a 16-bit LUT (high byte empty),
    # the little-endian one as v*256: the same colours to within one display level.
    ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm", 1.0),
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 1e-3),
])
def test_lossless_syntaxes_match_uncompressed(lossless: str, reference: str, atol: float) -> None:
    np.testing.assert_allclose(decode_file(sample(lossless)).pixels, decode_file(sample(reference)).pixels,
                               atol=atol)


def test_monochrome1_is_inverted_after_window() -> None:
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    stored = ds.pixel_array.astype(float)
    image = decode_file(sample("RG1_UNCR.dcm"))
    # MONOCHROME1: high stored values are dark.  Correlation with stored values must be negative.
    assert np.corrcoef(stored.ravel()[::97], image.pixels.ravel()[::97])[0, 1] < -0.9
    # Window 15000/30000 over 15-bit data: stored s maps to 255 * (1 - s/30000) roughly.
    y, x = 1000, 900
    expected = 255.0 * (1.0 - min(stored[y, x], 30000.0) / 30000.0)
    assert abs(float(image.pixels[y, x]) - expected) < 1.0


def test_modality_lut_and_padding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    arr = ds.pixel_array.copy()
    arr[:10, :] = -2000  # the file's Pixel Padding Value
    ds.PixelData = arr.tobytes()
    ds.WindowCenter, ds.WindowWidth = 40, 400
    image = decode(ds)
    assert image.padding is not None and image.padding[:10].all() and not image.padding[10:].any()
    assert float(image.pixels[:10].max()) == 0.0
    # Soft tissue window: rescaled HU of 40 must land mid-grey.
    hu = arr.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y, x = np.argwhere(np.abs(hu - 40) < 3)[0]
    assert 120 < float(image.pixels[y, x]) < 135


def test_voi_lut_sequence_and_presentation_inverse() -> None:
    ds = pydicom.dcmread(sample("vlut_04.dcm"))
    plain = decode(ds).pixels
    assert plain.max() <= 255.0 and plain.std() > 5
    ds.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(decode(ds).pixels, 255.0 - plain, atol=1e-3)


def test_explicit_frame_selection() -> None:
    path = sample("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    first = decode_file(path, frame=0)
    last = decode_file(path, frame=-1)
    assert first.frame_index == 0 and last.frame_index == 9
    assert np.corrcoef(first.pixels.ravel(), frames[0].ravel())[0, 1] > 0.99
    assert np.corrcoef(last.pixels.ravel(), frames[9].ravel())[0, 1] > 0.99
    with pytest.raises(DecodeError, match="frame 10 requested but the image has 10"):
        decode_file(path, frame=10)


def test_metadata_for_the_gate() -> None:
    image = decode_file(sample("RG1_UNCR.dcm"))
    assert (image.modality, image.body_part, image.view, image.photometric) == ("CR", "CHEST", "PA", "MONOCHROME1")
    assert (image.rows, image.columns) == (1955, 1841)


@pytest.mark.parametrize("name,reason", [
    ("MR_truncated.dcm", "less than expected"),
    ("rtplan.dcm", "no pixel data"),
    ("meta_missing_tsyntax.dcm", "Transfer Syntax"),
    ("JPEG-lossy.dcm", "cannot be decoded"),
])
def test_undecodable_samples_raise_decode_error(name: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_file(sample(name))


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 200 + b"not dicom at all")
    with pytest.raises(DecodeError):
        decode_file(junk)
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DecodeError, match="not a readable PNG/JPEG"):
        decode_file(bad_png)
    with pytest.raises(DecodeError, match="cannot be read"):
        decode_file(tmp_path / "absent.dcm")


def test_png_and_jpeg(tmp_path: Path) -> None:
    grey = (np.arange(28 * 28) % 251).reshape(28, 28).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = decode_file(tmp_path / "g.png")
    assert image.source_kind == "image" and not image.is_colour
    np.testing.assert_array_equal(image.pixels, grey.astype(np.float32))  # bit-exact for 8-bit PNG
    Image.fromarray(grey).convert("RGB").save(tmp_path / "g_rgb.png")
    assert not decode_file(tmp_path / "g_rgb.png").is_colour  # grey stored as RGB is not colour
    sixteen = (grey.astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    np.testing.assert_allclose(decode_file(tmp_path / "g16.png").pixels, grey, atol=0.01)
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = np.linspace(0, 255, 60, dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    colour = decode_file(tmp_path / "c.jpg")
    assert colour.is_colour and colour.pixels.shape == (40, 60, 3)
    assert to_grey(colour.pixels).shape == (40, 60)


NUMBER_OF_FRAMES = Tag(0x00280008)


def _frames_value(name: str, raw: bytes) -> pydicom.Dataset:
    """A sample whose Number of Frames holds ``raw`` as written on the wire, re-read from bytes."""
    ds = pydicom.dcmread(sample(name))
    value = raw + b" " if len(raw) % 2 else raw
    ds[NUMBER_OF_FRAMES] = RawDataElement(NUMBER_OF_FRAMES, "IS", len(value), value, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.2")
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("name,held", [
    ("color3d_jpeg_baseline.dcm", 120),  # JPEG baseline, no offset table: counted by SOI markers
    ("examples_ybr_color.dcm", 30),  # JPEG baseline with a basic offset table
    ("OBXXXX1A_2frame.dcm", 2),  # native: counted by length
    ("OBXXXX1A_rle_2frame.dcm", 2),  # RLE: one fragment per frame
    ("emri_small_jpeg_2k_lossless.dcm", 10),  # JPEG 2000 codestreams
])
@pytest.mark.parametrize("raw,shown", [(b"", "empty"), (b"0", "invalid"), (b"-3", "invalid"), (b"abc", "invalid")])
def test_broken_number_of_frames_on_a_multi_frame_image_is_refused(name: str, held: int, raw: bytes,
                                                                   shown: str) -> None:
    with pytest.raises(DecodeError, match=f"Number of Frames is {shown}.* holds {held} frames"):
        decode(_frames_value(name, raw))


@pytest.mark.parametrize("name", [
    "US1_UNCR.dcm",  # native RGB, one frame's worth of bytes
    "US1_J2KR.dcm",  # JPEG 2000, one frame in three fragments
    "OBXXXX1A_rle.dcm",  # RLE, one fragment
])
def test_empty_number_of_frames_on_a_single_frame_image_reads_one_frame(name: str) -> None:
    image = decode(_frames_value(name, b""))
    reference = decode_file(sample(name))
    assert (image.frames, image.frame_index) == (1, 0)
    np.testing.assert_array_equal(image.pixels, reference.pixels)


def _with_patched_frame(name: str, marker: bytes, offset: int, value: bytes):
    """A copy of sample ``name`` whose first codestream has ``value`` written ``offset`` bytes
    after ``marker`` (the stored sample is untouched)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments

    from tests.helpers import sample

    ds = pydicom.dcmread(sample(name))
    # pydicom yields the Basic Offset Table item first (empty here): the frames follow.
    fragments = [bytearray(f) for f in generate_fragments(ds.PixelData)][1:]
    at = bytes(fragments[0]).find(marker)
    assert at >= 0, f"{marker.hex()} not found in {name}"
    fragments[0][at + offset:at + offset + len(value)] = value
    ds.PixelData = encapsulate([bytes(f) for f in fragments])
    return ds


def test_a_jpeg2000_frame_claiming_a_larger_image_is_refused_before_decoding():
    import struct

    from appliance.errors import DecodeError
    from appliance.imaging.decode import decode_dataset

    # Xsiz (4 bytes after Lsiz and Rsiz) 1,955 -> 2,098,912: the decoder would allocate GBs.
    ds = _with_patched_frame("RG1_J2KR.dcm", b"\xff\x4f\xff\x51", 8, struct.pack(">I", 2_098_912))
    with pytest.raises(DecodeError, match="2098912x"):
        decode_dataset(ds)


def test_a_jpeg_frame_claiming_another_size_is_refused_and_intact_frames_decode():
    import struct

    from appliance.errors import DecodeError
    from appliance.imaging.decode import decode_dataset

    from tests.helpers import sample

    import pydicom

    assert decode_dataset(pydicom.dcmread(sample("SC_rgb_jpeg_dcmtk.dcm"))).rows > 0
    # SOF0: marker, length (2), precision (1), rows (2), columns (2): columns -> 60,000.
    ds = _with_patched_frame("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0", 7, struct.pack(">H", 60_000))
    with pytest.raises(DecodeError, match="60000x"):
        decode_dataset(ds)

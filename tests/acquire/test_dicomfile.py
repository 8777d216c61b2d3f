"""parse_part10: what the door accepts can be read completely later; what it refuses says why."""
from __future__ import annotations

import random

import pydicom
import pytest

from appliance.dicomfile import parse_part10
from appliance.errors import InvalidDatasetError
from tests.acquire.test_scp_bad_input import split_part10
from tests.helpers import sample

ROWS_EXPLICIT = b"\x28\x00\x10\x00US\x02\x00"  # (0028,0010) Rows, US, 2 bytes


def _reads_completely(data: bytes) -> None:
    from io import BytesIO

    for _elem in pydicom.dcmread(BytesIO(data)).iterall():
        pass


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                                  "test-SR.dcm", "rtplan.dcm", "OBXXXX1A_rle.dcm"])
def test_real_files_are_accepted(name):
    ds = parse_part10(sample(name).read_bytes())
    assert ds.SOPInstanceUID


def test_a_number_of_the_wrong_length_is_refused():
    data = sample("CT_small.dcm").read_bytes()
    at = data.index(ROWS_EXPLICIT)
    bad = data[:at] + b"\x28\x00\x10\x00US\x03\x00" + data[at + 8:at + 10] + b"\x00" + data[at + 10:]
    with pytest.raises(InvalidDatasetError, match=r"\(0028,0010\) \(US\) is 3 bytes long"):
        parse_part10(bad)


def test_an_unknown_vr_is_refused():
    data = sample("CT_small.dcm").read_bytes()
    at = data.index(ROWS_EXPLICIT)
    bad = data[:at + 4] + b"QQ" + data[at + 6:]
    with pytest.raises(InvalidDatasetError, match="cannot parse dataset"):
        parse_part10(bad)


@pytest.mark.filterwarnings("ignore")
def test_a_garbled_nested_sequence_is_refused():
    ds = pydicom.dcmread(sample("rtplan.dcm"))
    assert any(e.VR == "SQ" for e in ds)
    data = sample("rtplan.dcm").read_bytes()
    # Inside the first item of the first sequence, turn an item's length into nonsense.
    first_item = data.index(b"\xfe\xff\x00\xe0", 300)
    bad = data[:first_item + 4] + b"\xff\xff\xff\x7f" + data[first_item + 8:]
    with pytest.raises(InvalidDatasetError):
        parse_part10(bad)


@pytest.mark.filterwarnings("ignore")  # pydicom warns about each damaged element it reads
def test_whatever_is_accepted_reads_completely():
    """Random damage near the start of real files: each dataset the door accepts converts every
    element, nested ones included, as the analysis worker and viewers will."""
    rng = random.Random(7)
    names = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "test-SR.dcm",
             "OBXXXX1A_rle.dcm"]
    parts = [split_part10(sample(n)) for n in names]
    accepted = refused = 0
    for _ in range(600):
        meta, body = parts[rng.randrange(len(parts))]
        data = bytearray(body)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(min(len(data), 1500))] ^= 1 << rng.randrange(8)
        blob = meta + bytes(data)
        try:
            parse_part10(blob)
        except InvalidDatasetError:
            refused += 1
            continue
        accepted += 1
        _reads_completely(blob)
    assert accepted > 100 and refused > 100, (accepted, refused)


COMPRESSED = ["JPEG2000.dcm", "OBXXXX1A_rle.dcm", "color3d_jpeg_baseline.dcm", "RG1_J2KR.dcm",
              "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle_2frame.dcm"]


@pytest.mark.parametrize("name", COMPRESSED)
def test_encapsulated_items_are_counted_as_pydicom_reads_them(name):
    from pydicom.encaps import generate_fragments

    from appliance.dicomfile import count_encapsulated_items

    pixels = pydicom.dcmread(sample(name)).PixelData
    assert count_encapsulated_items(pixels) == sum(1 for _ in generate_fragments(pixels)) >= 2


def _with_pixel_data(value: bytes) -> bytes:
    """JPEG2000.dcm with its encapsulated pixel data value replaced (undefined length, so the
    sequence delimiter follows)."""
    data = sample("JPEG2000.dcm").read_bytes()
    head = data[:data.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12]
    return head + value + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_malformed_encapsulated_pixel_data_is_refused():
    from appliance.dicomfile import count_encapsulated_items

    bot = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    fragment = b"\xfe\xff\x00\xe0\x04\x00\x00\x00\xff\x4f\xff\x51"
    assert parse_part10(_with_pixel_data(bot + fragment)).PixelData == bot + fragment
    with pytest.raises(ValueError, match="runs 2 bytes past the end"):
        count_encapsulated_items(bot + fragment[:-2])  # a truncated last fragment
    for value, why in [(bot, "has no fragments"),
                       (bot + b"\x08\x00\x16\x00\x04\x00\x00\x00abcd", r"unexpected tag \(0008,0016\)"),
                       (bot + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + fragment, "undefined item length"),
                       (bot + fragment + b"\xfe\xff\x00", "item header truncated")]:
        with pytest.raises(InvalidDatasetError, match=why):
            parse_part10(_with_pixel_data(value))


def test_garbled_text_under_iso_2022_code_extensions_is_refused_before_anything_is_stored(tmp_path):
    """pydicom's ISO 2022 decoder raises IndexError on some garbled names (fuzz case D7081):
    found when the store indexed the file, it left the file without a row. It is found at
    parse time now, so the C-STORE gets 0xC000 and nothing reaches the instance store."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    from appliance.db import open_database
    from appliance.dicomfile import parse_part10
    from appliance.errors import InvalidDatasetError
    from appliance.store import InstanceStore

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO 2022 IR 87"
    ds.PatientName = "X"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    at = data.find(b"\x10\x00\x10\x00PN\x02\x00X ")
    assert at > 0
    data = data[:at] + b"\x10\x00\x10\x00PN\x06\x00OB^^^^" + data[at + 10:]
    with pytest.raises(InvalidDatasetError, match="IndexError"):
        parse_part10(data)
    store = InstanceStore(tmp_path / "data", open_database(tmp_path / "data"), 0)
    with pytest.raises(InvalidDatasetError):
        store.store(data)
    assert not list((tmp_path / "data" / "instances").rglob("*.dcm"))

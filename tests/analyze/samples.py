"""Synthetic inputs the gate must refuse: a colour photograph (PNG and DICOM SC), blank images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def colour_photo(height: int = 480, width: int = 640, seed: int = 7) -> np.ndarray:
    """A landscape-like RGB picture: blue sky gradient, green hills, a yellow sun, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), dtype=np.float32)
    sky = y / height
    img[..., 0] = 90 + 80 * sky
    img[..., 1] = 150 + 60 * sky
    img[..., 2] = 235 - 20 * sky
    horizon = height * 0.6 + 25 * np.sin(x / 70.0) + 10 * np.sin(x / 23.0)
    ground = y > horizon
    img[ground] = np.stack([60 + 0.05 * y[ground], 140 - 0.08 * y[ground], 50 + 0 * y[ground]], axis=-1)
    sun = (x - width * 0.75) ** 2 + (y - height * 0.2) ** 2 < (height * 0.08) ** 2
    img[sun] = (250, 220, 60)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def write_secondary_capture(path: Path, rgb: np.ndarray, modality: str = "DX", body_part: str = "CHEST",
                            view: str = "PA") -> Path:
    """An uncompressed RGB DICOM image with chest-radiograph metadata (so only colour can refuse it)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "TEST", modality, body_part, view
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path

"""AI results as standard DICOM objects in the source's study: a TID 1500 SR and a heatmap SC."""
from __future__ import annotations

from .common import write_part10
from .secondary_capture import build_heatmap_sc
from .sr import build_ai_sr

__all__ = ["build_ai_sr", "build_heatmap_sc", "write_part10"]

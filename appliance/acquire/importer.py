"""Import DICOM files from folders, single files, USB sticks and CDs (DICOMDIR)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pydicom

from ..errors import ImportPathError, InvalidDatasetError, OutOfSpaceError, StoreError, UnparsableDatasetError
from ..lifecycle import Source
from ..store import InstanceStore

log = logging.getLogger(__name__)


@dataclass
class ImportSummary:
    """Counts and reasons of one import run."""

    imported: int = 0
    replaced: int = 0
    duplicate: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "replaced": self.replaced,
            "duplicate": self.duplicate,
            "rejected": [{"file": f, "reason": r} for f, r in self.rejected],
        }


def _dicomdir_files(dicomdir: Path) -> Iterator[Path]:
    """Files referenced by a DICOMDIR (the layout on CDs and many USB exports)."""
    try:
        ds = pydicom.dcmread(dicomdir)
        records = ds.DirectoryRecordSequence
    except Exception as exc:  # noqa: BLE001 - a broken DICOMDIR falls back to walking the tree
        log.warning("DICOMDIR %s unreadable (%s); scanning the folder instead", dicomdir, exc)
        yield from _walk(dicomdir.parent)
        return
    for record in records:
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        yield dicomdir.parent.joinpath(*parts)


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.upper() != "DICOMDIR":
            yield path


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Every candidate file under ``paths``; ImportPathError for a path that does not exist."""
    files: list[Path] = []
    for root in paths:
        if not root.exists():
            raise ImportPathError(f"{root}: no such file or directory")
        if root.is_file() and root.name.upper() == "DICOMDIR":
            files.extend(_dicomdir_files(root))
        elif root.is_file():
            files.append(root)
        elif (root / "DICOMDIR").is_file():
            files.extend(_dicomdir_files(root / "DICOMDIR"))
        else:
            files.extend(_walk(root))
    return files


def import_files(
    store: InstanceStore, files: list[Path], progress: Callable[[Path], None] | None = None
) -> ImportSummary:
    """Store each file as it is on disk; one bad file never stops the others."""
    summary = ImportSummary()
    for path in files:
        try:
            data = path.read_bytes()
            if len(data) < 132 or data[128:132] != b"DICM":
                raise UnparsableDatasetError("not a DICOM Part 10 file (no DICM preamble)")
            outcome = store.store(data, calling_ae="", source=Source.IMPORT)
        except OutOfSpaceError:
            raise
        except (InvalidDatasetError, StoreError, OSError) as exc:
            summary.rejected.append((str(path), str(exc)))
        else:
            if outcome.action == "duplicate":
                summary.duplicate += 1
            elif outcome.action == "replaced":
                summary.replaced += 1
            else:
                summary.imported += 1
        if progress is not None:
            progress(path)
    return summary

"""Values as people read them on every screen: local times, DICOM person names, ages and byte
counts, in the user's language."""
from __future__ import annotations

from datetime import date, datetime

from flask_babel import format_decimal
from flask_babel import gettext as _


def local_time(iso: str) -> str:
    """An ISO timestamp in the box's time zone: ``14:05`` today, else ``2026-03-01 14:05``."""
    try:
        moment = datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso
    if moment.date() == date.today():
        return moment.strftime("%H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")


def patient_name(dicom_name: str) -> str:
    """DICOM PN ``FAMILY^GIVEN^MIDDLE`` -> ``FAMILY, GIVEN MIDDLE``."""
    parts = [p for p in dicom_name.split("=")[0].split("^")]
    family, rest = (parts[0], " ".join(p for p in parts[1:] if p)) if parts else ("", "")
    return f"{family}, {rest}" if rest else family


def age(birth_date: str, at: str = "") -> str:
    """DICOM DA birth date -> "34 y" / "5 mo" / "12 d" at the study date (else today)."""
    try:
        born = datetime.strptime(birth_date, "%Y%m%d").date()
    except ValueError:
        return ""
    try:
        when = datetime.strptime(at, "%Y%m%d").date() if at else date.today()
    except ValueError:
        when = date.today()
    days = (when - born).days
    if days < 0:
        return ""
    years = when.year - born.year - ((when.month, when.day) < (born.month, born.day))
    if years >= 2:
        return _("%(n)d y", n=years)
    months = (when.year - born.year) * 12 + when.month - born.month - (when.day < born.day)
    if months >= 1:
        return _("%(n)d mo", n=months)
    return _("%(n)d d", n=days)


def human_bytes(count: int) -> str:
    """A byte count for people: 0 B, 812 kB, 7.2 MB, 1.4 GB (decimal units, as disks are sold),
    with the user's decimal separator (French writes 7,2 Mo)."""
    def figure(value: float) -> str:
        return str(format_decimal(value, format="0" if value >= 100 else "0.#"))

    if count >= 10**9:
        return _("%(n)s GB", n=figure(count / 1e9))
    if count >= 10**6:
        return _("%(n)s MB", n=figure(count / 1e6))
    if count >= 10**3:
        return _("%(n)s kB", n=figure(count / 1e3))
    return _("%(n)s B", n=count)

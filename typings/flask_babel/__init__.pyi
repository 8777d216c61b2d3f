# Type stub for the part of Flask-Babel 4 that web/ uses.  The package annotates its return
# types but ships no py.typed marker, so mypy would otherwise read every call as Any; the
# signatures here are those of flask_babel/__init__.py (4.0).
from collections.abc import Callable
from decimal import Decimal

from flask import Flask

from .speaklater import LazyString

class Babel:
    def __init__(
        self,
        app: Flask | None = None,
        date_formats: dict[str, str | None] | None = None,
        configure_jinja: bool = True,
        *,
        default_locale: str = "en",
        default_domain: str = "messages",
        default_translation_directories: str = "translations",
        default_timezone: str = "UTC",
        locale_selector: Callable[[], str | None] | None = None,
        timezone_selector: Callable[[], str | None] | None = None,
    ) -> None: ...

def gettext(string: str, **variables: object) -> str: ...
def lazy_gettext(string: str, **variables: object) -> LazyString: ...
def format_decimal(number: float | Decimal, format: str | None = None) -> str: ...

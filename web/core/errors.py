"""Error pages that say what went wrong in words a clinic user can act on (HTML), or a small
JSON body for the API.  Nothing here echoes request data back (no reflected content)."""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, render_template, request
from flask_babel import gettext as _
from werkzeug.exceptions import HTTPException, InternalServerError

from .security import wants_json

log = logging.getLogger(__name__)


def _message(code: int, description: str) -> tuple[str, str]:
    if code == 400 and description == "csrf":
        return _("Form expired"), _("This form was open too long or came from another page. Go back, reload the page and try again.")
    if code == 400:
        return _("Bad request"), _("The request was incomplete or malformed.")
    if code == 401:
        return _("Sign-in required"), _("Please sign in.")
    if code == 403:
        return _("Not allowed"), _("Your role does not allow this action. Ask an administrator if you need it.")
    if code == 404:
        return _("Not found"), _("This page, study or image does not exist on this device.")
    if code == 405:
        return _("Not allowed"), _("This address does not accept that kind of request.")
    if code == 413:
        return _("Too large"), _("The submitted data is too large.")
    return _("Something went wrong"), _("The device could not complete the request. It has been logged; please try again.")


def _handle(exc: HTTPException) -> Any:
    code = exc.code or 500
    title, message = _message(code, str(exc.description or ""))
    if wants_json():
        return jsonify(error=title, message=message, status=code), code
    return render_template("error.html", code=code, title=title, message=message), code


def _handle_unexpected(exc: Exception) -> Any:
    # The exception's message may quote patient data (a name in a KeyError, a query value), so
    # the log gets its type and the code locations only, never the message or request data.
    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))
    log.error("unhandled %s in %s %s at %s", type(exc).__name__, request.method, request.endpoint, where)
    return _handle(InternalServerError())


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, _handle)
    app.register_error_handler(Exception, _handle_unexpected)

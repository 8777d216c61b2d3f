"""The worklist: studies in triage order with search, filters and pagination."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, render_template, request

from web.core.security import database

from .. import queries

bp = Blueprint("worklist", __name__)


def filters() -> dict[str, Any]:
    """The worklist's query-string filters, sanitised (unknown values are ignored; a page that
    is not a page number is a bad request, one past the end shows the last page)."""
    try:
        page = queries.page_number(request.args.get("page", ""))
    except ValueError:
        abort(400)
    priority = request.args.get("priority", "")
    state = request.args.get("state", "")
    return {
        "search": request.args.get("q", "").strip()[:64],
        "priority": priority if priority in queries.PRIORITIES else "",
        "state": state if state in queries.STATES else "",
        "page": page,
    }


@bp.get("/")
def index() -> Any:
    chosen = filters()
    result = queries.worklist(database(), page_size=current_app.config["WORKLIST_PAGE_SIZE"], **chosen)
    return render_template("worklist.html", result=result, filters=chosen,
                           priorities=[(p, queries.priority_words(p)) for p in queries.PRIORITIES],
                           states=[(s, queries.state_words(s)) for s in queries.STATES])

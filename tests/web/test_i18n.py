"""Internationalisation: French is complete, the shipped .mo files match their .po sources,
the catalogue covers every string in the code, and a user's language setting is applied."""
from __future__ import annotations

import gettext
from pathlib import Path
from typing import Any

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from appliance import accounts
from tests.web.conftest import CHEST, login

WEB = Path(__file__).resolve().parents[2] / "web"
PO = WEB / "translations" / "fr" / "LC_MESSAGES" / "messages.po"
MO = PO.with_suffix(".mo")
METHODS = [("**.py", "python"), ("**/templates/**.html", "jinja2")]  # as web/babel.cfg
KEYWORDS = {"_": None, "gettext": None, "lazy_gettext": None}


def _source_ids() -> set[str]:
    ids = set()
    for _file, _line, message, _comments, _context in extract_from_dir(str(WEB), METHODS, keywords=KEYWORDS):
        ids.add(message if isinstance(message, str) else message[0])
    return ids


def test_french_is_complete_and_covers_the_code() -> None:
    with open(PO, "rb") as fh:
        catalog = read_po(fh)
    translated = {m.id: m.string for m in catalog if m.id}
    missing = sorted(_source_ids() - set(translated))
    assert not missing, f"strings not in the French catalogue: {missing}"
    empty = sorted(k for k, v in translated.items() if not v)
    assert not empty, f"untranslated: {empty}"
    assert not [m.id for m in catalog if m.id and m.fuzzy]


def test_shipped_mo_matches_po() -> None:
    with open(PO, "rb") as fh:
        catalog = read_po(fh)
    with open(MO, "rb") as fh:
        compiled = gettext.GNUTranslations(fh)
    for message in catalog:
        if message.id:
            assert compiled.gettext(message.id) == message.string, message.id


def test_french_user_sees_french(study_app: Any) -> None:
    db = study_app.extensions["appliance_db"]
    accounts.set_language(db, accounts.find_user(db, "staff").id, "fr")
    client = study_app.test_client()
    login(client, "staff")
    worklist = client.get("/").text
    assert 'lang="fr"' in worklist and "Liste de travail" in worklist and "Aide IA — pas un diagnostic" in worklist
    assert ">Urgent<" in worklist and "Reçu" in worklist
    rows = client.get("/api/worklist").json["rows"]
    assert any(r["ai"]["text"] == "abstention : aucun modèle IA pour ce type d’image" for r in rows)
    assert rows[0]["age"].endswith(" ans")
    study = client.get(f"/study/{study_app.config['STUDY_UIDS'][CHEST]}").text
    assert "Marquer comme relu" in study and "seuil de décision" in study and "Pas encore de compte rendu." in study
    assert "Examen introuvable" not in study
    assert "Introuvable" in client.get("/study/nope").text
    other = study_app.test_client()  # another user's language is unaffected
    login(other, "viewer")
    assert "Worklist" in other.get("/").text


def test_language_chosen_before_sign_in(app: Any) -> None:
    client = app.test_client()
    assert "Connexion" in client.get("/login?lang=fr").text
    assert "Connexion" in client.get("/login").text  # remembered in the session
    english = app.test_client()
    assert "Sign in" in english.get("/login", headers={"Accept-Language": "en-GB,en"}).text
    assert "Connexion" in app.test_client().get("/login", headers={"Accept-Language": "fr-FR,fr;q=0.9"}).text

"""Fixtures for the web UI tests: a temp data directory, the app, users of every role, and
studies ingested and analysed through the real pipeline (store + worker + a toy model)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from appliance import accounts
from appliance.config import load_config
from appliance.db import open_database
from tests.analyze.toy_package import MODEL_ID, US_MODEL_ID, build_package, write_manifest
from tests.helpers import sample

PASSWORDS = {"admin": "admin-password-1", "staff": "staff-password-1", "viewer": "viewer-password-1"}
STAFF_PIN = "2468"
CHEST, CLIP, CT = "RG1_UNCR.dcm", "color3d_jpeg_baseline.dcm", "CT_small.dcm"
HUB_SECRET = "s3cret-value"  # must never appear on a page


@pytest.fixture(scope="session")
def urgent_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model packages for tests: the toy chest model with its operating point lowered to 0.01,
    so a real chest radiograph is deterministically positive (urgent), and the toy ultrasound
    model.  Real ONNX models run by the real runner; only the threshold is chosen."""
    root = tmp_path_factory.mktemp("web-engines")
    build_package(root, MODEL_ID, "cxr")
    write_manifest(root / MODEL_ID, MODEL_ID, threshold=0.01, kind="cxr")
    build_package(root, US_MODEL_ID, "us")
    return root


def make_config(data_dir: Path, engines_dir: Path | None = None) -> Any:
    overrides: dict[str, Any] = {"storage.data_dir": str(data_dir), "storage.min_free_mb": 0}
    if engines_dir is not None:
        overrides["analyze.engines_dir"] = str(engines_dir)
    return load_config(overrides=overrides, environ={})


def make_app(data_dir: Path, engines_dir: Path | None = None, **settings: Any) -> Any:
    from web import create_app

    return create_app(make_config(data_dir, engines_dir), {"TESTING": True, **settings})


def add_users(app: Any) -> None:
    db = app.extensions["appliance_db"]
    for role, password in PASSWORDS.items():
        user = accounts.create_user(db, role, password, role)
        if role == "staff":
            accounts.set_pin(db, user.id, STAFF_PIN)


@pytest.fixture
def app(tmp_path: Path) -> Any:
    application = make_app(tmp_path / "data")
    add_users(application)
    return application


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', html)
    if not match:
        raise AssertionError("no CSRF meta tag in the page")
    return match.group(1)


def login(client: Any, role: str, method: str = "password") -> str:
    """Sign in as ``role``; returns the session's CSRF token."""
    token = csrf_of(client.get(f"/login?method={method}").text)
    secret = {"pin": STAFF_PIN} if method == "pin" else {"password": PASSWORDS[role]}
    response = client.post("/login", data={"csrf_token": token, "method": method, "username": role, **secret})
    assert response.status_code == 302, response.text
    return csrf_of(client.get("/").text)


def ingest_and_analyse(data_dir: Path, engines_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Store real files through the durable store and run the analysis worker until idle.

    Returns file name -> Study Instance UID.
    """
    import pydicom

    from appliance.pipeline import Pipeline
    from appliance.store import InstanceStore

    config = make_config(data_dir, engines_dir)
    database = open_database(data_dir)
    store = InstanceStore(data_dir, database, 0)
    uids = {}
    for name in names:
        path = sample(name)
        store.store(path.read_bytes(), calling_ae="TEST", source="import")
        uids[name] = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    Pipeline(config, database, store).run_until_idle()
    database.close()
    return uids


@pytest.fixture(scope="session")
def analysed_data(tmp_path_factory: pytest.TempPathFactory, urgent_engines: Path) -> tuple[Path, dict[str, str]]:
    """A data directory with the chest CR (urgent), the ultrasound clip and the CT, analysed once
    per session; tests copy it so they can change it."""
    data_dir = tmp_path_factory.mktemp("analysed") / "data"
    uids = ingest_and_analyse(data_dir, urgent_engines, (CHEST, CLIP, CT))
    return data_dir, uids


@pytest.fixture
def study_app(tmp_path: Path, analysed_data: tuple[Path, dict[str, str]], urgent_engines: Path) -> Iterator[Any]:
    source, uids = analysed_data
    data_dir = tmp_path / "data"
    shutil.copytree(source, data_dir)
    application = make_app(data_dir, urgent_engines)
    add_users(application)
    application.config["STUDY_UIDS"] = uids
    yield application


def hub_site(directory: Path) -> Path:
    """A site file with one DICOMweb destination on an unused loopback port: requests queue and,
    if a sender tries, fail with a connection error and keep retrying.  Never a real address."""
    from tests.helpers import free_port

    site = directory / "site.toml"
    site.write_text('[[destinations]]\nname = "hub"\nkind = "dicomweb"\n'
                    f'url = "http://127.0.0.1:{free_port()}/dicom-web"\nretry_max_s = 300\n'
                    f'username = "clinic"\npassword = "{HUB_SECRET}"\n')
    return site


@pytest.fixture
def hub_app(tmp_path: Path, analysed_data: tuple[Path, dict[str, str]], urgent_engines: Path) -> Iterator[Any]:
    """Like ``study_app``, with the destination ``hub`` configured (see :func:`hub_site`)."""
    from web import create_app

    source, uids = analysed_data
    data_dir = tmp_path / "data"
    shutil.copytree(source, data_dir)
    config = load_config(hub_site(tmp_path), {"storage.data_dir": str(data_dir), "storage.min_free_mb": 0,
                                              "analyze.engines_dir": str(urgent_engines)}, environ={})
    application = create_app(config, {"TESTING": True})
    add_users(application)
    application.config["STUDY_UIDS"] = uids
    yield application

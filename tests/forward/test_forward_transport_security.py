"""Transport security to the hub: DICOM TLS to a real Orthanc (client certificate required) and
DICOMweb over HTTPS with basic auth or a bearer token.  A wrong CA, a missing client certificate,
a wrong password or a wrong token is a visible error on the item, which keeps retrying (network
and credential trouble never fails an item permanently) and goes through once the configuration
is fixed."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest

from appliance.forward import (
    destination_status,
    request_forward,
    retry_item,
    study_forwarding,
)
from tests.forward.conftest import PASSWORD, USER
from tests.forward.local_peers import HttpsProxy, Pki, make_box, make_pki, tls_orthanc
from tests.helpers import sample

TOKEN = "hub-token-7c1e"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def dicom_tls_destination(hub, pki: Pki, ca: Path, with_client_cert: bool = True) -> str:
    lines = ['[[destinations]]', 'name = "hub"', 'kind = "dicom"', 'host = "127.0.0.1"', f"port = {hub.dicom_port}",
             'called_ae = "HUB"', "deidentify = false", "attach_ai_results = false", "retry_max_s = 60",
             f'tls_ca = "{ca}"']
    if with_client_cert:
        lines += [f'tls_cert = "{pki.client_cert}"', f'tls_key = "{pki.client_key}"']
    return "\n".join(lines) + "\n"


def dicomweb_destination(url: str, ca: Path, auth: str) -> str:
    return ("[[destinations]]\nname = \"hub\"\nkind = \"dicomweb\"\n"
            f'url = "{url}"\ntls_ca = "{ca}"\ndeidentify = false\nattach_ai_results = false\nretry_max_s = 60\n{auth}\n')


def queue_ct(box) -> tuple[str, str, int]:
    """The CT sample stored on the box and queued for ``hub``: (study, sop uid, item id)."""
    outcome = box.store.store(sample("CT_small.dcm").read_bytes(), source="import")
    item = request_forward(box.db, box.config, outcome.study_uid, "hub", "routine", "test")
    return outcome.study_uid, outcome.sop_instance_uid, item


def assert_retrying(box, study: str, *words: str) -> dict:
    """The item is still trying (never failed-permanent), with a last error naming the problem,
    and the destination is backed off with a next retry."""
    (item,) = study_forwarding(box.db, study)
    assert item["state"] == "sending" and item["reason"] == "", item
    assert item["instances"]["pending"] == 1 and item["instances"]["confirmed"] == 0, item
    for word in words:
        assert word in item["last_error"], item["last_error"]
    (dest,) = destination_status(box.db, box.config)
    assert dest["queue_length"] == 1 and dest["consecutive_failures"] >= 1 and dest["next_retry_at"], dest
    assert dest["last_error"] == item["last_error"] and dest["last_success_at"] == ""
    return item


def again(box, item_id: int) -> None:
    """`appliance outbox retry ID` on a waiting item: try now instead of after the backoff."""
    retry_item(box.db, item_id, "test")
    box.drain()


# -- DICOM TLS ------------------------------------------------------------------------------------
def test_dicom_tls_delivers_and_confirms_over_tls(tmp_path, orthanc_factory, pki):
    hub = tls_orthanc(orthanc_factory, pki)
    box = make_box(tmp_path, dicom_tls_destination(hub, pki, pki.ca))
    study, sop, item_id = queue_ct(box)
    box.drain()

    (item,) = study_forwarding(box.db, study)
    assert item["id"] == item_id and item["state"] == "confirmed", item  # C-STORE and C-FIND over TLS
    assert [hub.tags(i)["SOPInstanceUID"] for i in hub.instance_ids()] == [sop]
    # The port really is TLS-only: a plain association is not accepted.
    plain = subprocess.run(["echoscu", "-to", "5", "-aec", "HUB", "127.0.0.1", str(hub.dicom_port)],
                           check=False, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0


def test_dicom_tls_wrong_ca_keeps_retrying_then_delivers(tmp_path, orthanc_factory, pki):
    hub = tls_orthanc(orthanc_factory, pki)
    box = make_box(tmp_path, dicom_tls_destination(hub, pki, pki.other_ca))
    study, sop, item_id = queue_ct(box)
    box.drain()
    assert_retrying(box, study, "hub", "127.0.0.1")
    again(box, item_id)  # and again: still retrying, never failed
    item = assert_retrying(box, study)
    assert item["attempts"] == 2 and destination_status(box.db, box.config)[0]["consecutive_failures"] == 2
    assert hub.instance_count() == 0

    # The site fixes its CA file: the same item goes through, nothing was lost.
    fixed = make_box(tmp_path / "fixed", dicom_tls_destination(hub, pki, pki.ca), data_dir=box.config.data_dir)
    again(fixed, item_id)
    assert study_forwarding(fixed.db, study)[0]["state"] == "confirmed"
    assert [hub.tags(i)["SOPInstanceUID"] for i in hub.instance_ids()] == [sop]
    (dest,) = destination_status(fixed.db, fixed.config)
    assert dest["last_success_at"] and dest["consecutive_failures"] == 0 and dest["last_error"] == ""


def test_dicom_tls_without_client_certificate_keeps_retrying(tmp_path, orthanc_factory, pki):
    hub = tls_orthanc(orthanc_factory, pki)
    box = make_box(tmp_path, dicom_tls_destination(hub, pki, pki.ca, with_client_cert=False))
    study, _, _ = queue_ct(box)
    box.drain()
    assert_retrying(box, study, "hub")
    assert hub.instance_count() == 0


def test_dicom_tls_wrong_ca_error_names_the_certificate_problem(tmp_path, orthanc_factory, pki):
    hub = tls_orthanc(orthanc_factory, pki)
    box = make_box(tmp_path, dicom_tls_destination(hub, pki, pki.other_ca))
    study, _, _ = queue_ct(box)
    box.drain()
    error = study_forwarding(box.db, study)[0]["last_error"].lower()
    assert "tls" in error and "certificate" in error, error


# -- DICOMweb over HTTPS ----------------------------------------------------------------------------
def test_https_basic_auth_delivers_and_a_wrong_password_is_an_error(tmp_path, orthanc, pki):
    proxy = HttpsProxy(orthanc, pki)
    try:
        box = make_box(tmp_path, dicomweb_destination(proxy.url, pki.ca, f'username = "{USER}"'),
                       environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": "not-the-password"})
        study, sop, item_id = queue_ct(box)
        box.drain()
        item = assert_retrying(box, study, "HTTP 401")
        assert item["attempts"] == 1 and orthanc.instance_count() == 0
        assert ("POST", "/dicom-web/studies", 401) in proxy.requests

        fixed = make_box(tmp_path / "fixed", dicomweb_destination(proxy.url, pki.ca, f'username = "{USER}"'),
                         environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD}, data_dir=box.config.data_dir)
        again(fixed, item_id)
        assert study_forwarding(fixed.db, study)[0]["state"] == "confirmed"
        assert [orthanc.tags(i)["SOPInstanceUID"] for i in orthanc.instance_ids()] == [sop]
        assert ("POST", "/dicom-web/studies", 200) in proxy.requests  # STOW-RS and QIDO-RS went over HTTPS
        assert any(m == "GET" and p.startswith("/dicom-web/studies/") and s == 200 for m, p, s in proxy.requests)
    finally:
        proxy.close()


def test_https_bearer_token_from_environment(tmp_path, orthanc, pki):
    proxy = HttpsProxy(orthanc, pki, token=TOKEN)
    try:
        box = make_box(tmp_path, dicomweb_destination(proxy.url, pki.ca, ""),
                       environ={"APPLIANCE_DESTINATIONS_HUB_TOKEN": "expired-token"})
        study, sop, item_id = queue_ct(box)
        box.drain()
        assert_retrying(box, study, "HTTP 401")
        assert orthanc.instance_count() == 0  # a wrong token is an error, nothing silently dropped

        fixed = make_box(tmp_path / "fixed", dicomweb_destination(proxy.url, pki.ca, ""),
                         environ={"APPLIANCE_DESTINATIONS_HUB_TOKEN": TOKEN}, data_dir=box.config.data_dir)
        again(fixed, item_id)
        (item,) = study_forwarding(fixed.db, study)
        assert item["state"] == "confirmed" and item["instances"]["confirmed"] == 1, item
        on_hub = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc.instance_ids()[0])))
        assert on_hub.SOPInstanceUID == sop
    finally:
        proxy.close()


def test_https_untrusted_server_certificate_keeps_retrying(tmp_path, orthanc, pki):
    proxy = HttpsProxy(orthanc, pki)
    try:
        box = make_box(tmp_path, dicomweb_destination(proxy.url, pki.other_ca, f'username = "{USER}"'),
                       environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
        study, _, _ = queue_ct(box)
        box.drain()
        assert_retrying(box, study, "SSLError")
        assert proxy.requests == [] and orthanc.instance_count() == 0  # no request got past the handshake
    finally:
        proxy.close()


def test_tls_ca_wins_over_a_ca_bundle_from_the_environment(tmp_path, orthanc, pki, monkeypatch):
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only, as on many device images
    proxy = HttpsProxy(orthanc, pki)
    try:
        box = make_box(tmp_path, dicomweb_destination(proxy.url, pki.ca, f'username = "{USER}"'),
                       environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
        study, _, _ = queue_ct(box)
        box.drain()
        (item,) = study_forwarding(box.db, study)
        assert item["state"] == "confirmed", item["last_error"]
    finally:
        proxy.close()

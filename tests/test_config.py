"""Configuration layering, validation and masking."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError
from tests.helpers import run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_defaults_firmware_site_env_cli(tmp_path):
    firmware = write(tmp_path / "fw.toml", '[dicom]\nae_title = "FW"\nport = 1001\n[http]\nport = 2001\n')
    site = write(tmp_path / "site.toml", '[dicom]\nport = 1002\n[http]\nport = 2002\nthreads = 3\n')
    env = {"APPLIANCE_HTTP_PORT": "2003", "APPLIANCE_HTTP_THREADS": "4"}
    config = load_config(site, {"http.threads": 5, "dicom.max_associations": None}, environ=env, firmware_file=firmware)
    assert config.get("storage.min_free_mb") == 500  # built-in default
    assert config.get("dicom.ae_title") == "FW"  # firmware over default
    assert config.get("dicom.port") == 1002  # site over firmware
    assert config.get("http.port") == 2003  # environment over site
    assert config.get("http.threads") == 5  # command line over environment
    assert config.get("dicom.max_associations") == 16  # an unset flag masks nothing
    assert config.sources[-1] == "command line"


def test_site_file_from_environment(tmp_path):
    site = write(tmp_path / "site.toml", '[dicom]\nallowed_calling_aes = ["CR1", "US2"]\n')
    config = load_config(environ={"APPLIANCE_CONFIG": str(site)}, firmware_file=None)
    assert config.get("dicom.allowed_calling_aes") == ["CR1", "US2"]
    env_list = load_config(environ={"APPLIANCE_DICOM_ALLOWED_CALLING_AES": "A, B"}, firmware_file=None)
    assert env_list.get("dicom.allowed_calling_aes") == ["A", "B"]


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("[dicom]\nport = 70000\n", {}, "dicom.port: 70000 is not a TCP port"),
        ('[dicom]\nport = "eleven"\n', {}, "dicom.port (from"),
        ('[dicom]\nae_title = "A_VERY_LONG_AE_TITLE_X"\n', {}, "dicom.ae_title"),
        ("[dicom]\ncolour = 1\n", {}, "dicom.colour (from"),
        ("[nosuch]\nx = 1\n", {}, "nosuch (from"),
        ("[dicom\n", {}, "not valid TOML"),
        ("", {"APPLIANCE_STORAGE_MIN_FREE_MB": "lots"}, "storage.min_free_mb (from environment): expected an integer"),
        ("", {"APPLIANCE_BOGUS_X": "1"}, "APPLIANCE_BOGUS_X"),
        ("[log]\nlevel = \"LOUD\"\n", {}, "log.level"),
        ("", {"APPLIANCE_DICOM_PROCESSES": "-1"}, "dicom.processes"),
    ],
)
def test_invalid_configuration_names_key_and_problem(tmp_path, text, env, message):
    site = write(tmp_path / "site.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(site, environ=env, firmware_file=None)
    assert message in str(info.value)


def test_missing_site_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={}, firmware_file=None)


def test_secrets_are_masked():
    config = load_config(environ={"APPLIANCE_HTTP_SECRET_KEY": "hunter2"}, firmware_file=None)
    assert config.get("http.secret_key") == "hunter2"
    assert config.masked()["http"]["secret_key"] == "***"
    assert "hunter2" not in json.dumps(config.masked())


def test_cli_fails_fast_on_bad_config(tmp_path):
    site = write(tmp_path / "site.toml", "[dicom]\nport = -1\n")
    result = run_cli("studies", "--config", str(site), "--data-dir", str(tmp_path / "d"))
    assert result.returncode != 0
    assert "configuration error: dicom.port: -1 is not a TCP port" in result.stderr
    result = run_cli("serve", "--data-dir", str(tmp_path / "d"), env={"APPLIANCE_CONFIG": str(site)})
    assert result.returncode != 0 and "dicom.port" in result.stderr


def test_serve_logs_effective_config_masked_and_healthz(server_factory):
    import requests

    server = server_factory(extra_env={"APPLIANCE_HTTP_SECRET_KEY": "s3cr3t-value"}).start()
    health = requests.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.stop() == 0
    log = server.log_path.read_text()
    assert "effective configuration" in log and '"secret_key": "***"' in log
    assert "s3cr3t-value" not in log
    assert "received SIGTERM, stopping" in log and "stopped" in log


DESTS = """
[[destinations]]
name = "hub"
kind = "dicomweb"
url = "https://hub.example/dicom-web"
username = "clinic7"
send_window = "22:00-06:00"

[[destinations]]
name = "radiology pacs"
kind = "dicom"
host = "10.0.0.5"
called_ae = "PACS"
compress = "jpeg2000-lossless"

[[forward_rules]]
when = "urgent"
to = "hub"
priority = "urgent"
"""


def test_destinations_and_rules_with_secrets_from_environment(tmp_path):
    site = write(tmp_path / "site.toml", DESTS)
    env = {"APPLIANCE_DESTINATIONS_HUB_PASSWORD": "pw-from-env", "APPLIANCE_DESTINATIONS_RADIOLOGY_PACS_PORT": "11113"}
    config = load_config(site, environ=env, firmware_file=None)
    hub = config.destination("hub")
    assert hub["password"] == "pw-from-env" and hub["deidentify"] is True and hub["max_rate_kbps"] == 0
    assert config.destination("radiology pacs")["port"] == 11113
    assert config["forward_rules"] == [{"when": "urgent", "to": "hub", "priority": "urgent"}]
    masked = json.dumps(config.masked())
    assert "pw-from-env" not in masked and "clinic7" in masked
    with pytest.raises(ConfigError, match="no destination named 'nope'"):
        config.destination("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[destinations]]\nname = "a"\nkind = "ftp"\n', "destinations[0].kind"),
        ('[[destinations]]\nkind = "dicom"\n', "destinations[0].name (from"),
        ('[[destinations]]\nname = "a"\nkind = "dicom"\ncalled_ae = "X"\n', "host: required"),
        ('[[destinations]]\nname = "a"\nkind = "dicomweb"\nurl = "hub"\n', "url: a DICOMweb base URL"),
        ('[[destinations]]\nname = "a"\nkind = "dicomweb"\nurl = "https://h"\nsend_window = "late"\n', "send_window"),
        ('[[destinations]]\nname = "a"\nkind = "dicomweb"\nurl = "https://h"\ncompress = "zip"\n', "compress"),
        ('[[destinations]]\nname = "a"\nkind = "dicomweb"\nurl = "https://h"\ncolour = 1\n', "destinations[0].colour"),
        ('[[forward_rules]]\nwhen = "urgent"\nto = "nowhere"\n', "forward_rules[0].to: no destination named"),
    ],
)
def test_invalid_destinations(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "site.toml", text), environ={}, firmware_file=None)
    assert message in str(info.value)


def _integer_keys() -> list[str]:
    from appliance.config import DEFAULTS

    return [f"{section}.{key}" for section, table in DEFAULTS.items() for key, value in table.items()
            if isinstance(value, int) and not isinstance(value, bool)]


def test_every_integer_key_has_bounds_and_the_firmware_file_documents_every_key():
    from appliance.config import BOUNDS, DEFAULTS, DESTINATION_BOUNDS, DESTINATION_KEYS, FIRMWARE_CONFIG

    assert set(_integer_keys()) == set(BOUNDS)
    assert {k for k, (d, _) in DESTINATION_KEYS.items() if isinstance(d, int) and not isinstance(d, bool)} \
        == set(DESTINATION_BOUNDS)
    for low, high in [*BOUNDS.values(), *DESTINATION_BOUNDS.values()]:
        assert low <= high
    firmware = load_config(environ={}, firmware_file=FIRMWARE_CONFIG)
    for dotted in _integer_keys():
        section, key = dotted.split(".")
        low, high = BOUNDS[dotted]
        assert low <= DEFAULTS[section][key] <= high, dotted
        assert firmware.get(dotted) == DEFAULTS[section][key], f"{dotted}: firmware file and built-in default differ"
    text = FIRMWARE_CONFIG.read_text()
    for key in DEFAULTS["dicom"]:
        assert f"\n{key} = " in text, f"dicom.{key} is not documented in {FIRMWARE_CONFIG.name}"


@pytest.mark.parametrize("dotted", _integer_keys())
def test_every_integer_key_out_of_range_is_refused_naming_the_key(tmp_path, dotted):
    from appliance.config import BOUNDS

    section, key = dotted.split(".")
    low, high = BOUNDS[dotted]
    for value in (low - 1, high + 1):
        site = write(tmp_path / "site.toml", f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(site, environ={}, firmware_file=None)
        assert str(info.value).startswith(f"{dotted}: {value} ")
    for value in (low, high):
        assert load_config(write(tmp_path / "ok.toml", f"[{section}]\n{key} = {value}\n"), environ={},
                           firmware_file=None).get(dotted) == value


@pytest.mark.parametrize("key, value", [("port", 0), ("port", 65536), ("max_rate_kbps", -1),
                                        ("max_rate_kbps", 10_000_001), ("poll_reports_s", 0),
                                        ("poll_reports_s", 86401), ("retry_max_s", 0), ("retry_max_s", 86401)])
def test_destination_numbers_out_of_range_are_refused(tmp_path, key, value):
    text = f'[[destinations]]\nname = "pacs"\nkind = "dicom"\nhost = "10.0.0.5"\ncalled_ae = "PACS"\n{key} = {value}\n'
    with pytest.raises(ConfigError, match=rf"^destinations\[0\] \(pacs\)\.{key}: {value} "):
        load_config(write(tmp_path / "site.toml", text), environ={}, firmware_file=None)


def test_sixty_four_receiving_processes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^dicom\.processes: 64 is out of range \(allowed: 0 to 16\)"):
        load_config(write(tmp_path / "site.toml", "[dicom]\nprocesses = 64\n"), environ={}, firmware_file=None)
    with pytest.raises(ConfigError, match=r"^dicom\.processes \(from environment\)|^dicom\.processes: 64"):
        load_config(environ={"APPLIANCE_DICOM_PROCESSES": "64"}, firmware_file=None)


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 4, "is a binary file (it contains NUL bytes), not TOML text"),
    (b"[dicom]\nae_title = \"\xff\xfe\"\n", "is not UTF-8 text (invalid byte at offset 20)"),
    (b"\x7fELF\x02\x01\x01" + b"\x90" * 64, "is not UTF-8 text"),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "is not valid TOML"),
])
def test_a_file_that_is_not_toml_text_is_a_config_error(tmp_path, content, message):
    site = tmp_path / "site.toml"
    site.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(site, environ={}, firmware_file=None)


def test_cli_with_a_binary_config_file_says_so_in_one_line(tmp_path):
    site = tmp_path / "site.toml"
    site.write_bytes(bytes(range(256)) * 64)
    result = run_cli("serve", "--config", str(site), "--data-dir", str(tmp_path / "d"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "configuration error: config file" in lines[0] and "binary file" in lines[0], lines

"""Configuration layering, validation and masking."""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import typing
from pathlib import Path

import pytest

from appliance.config import Config, Destination, ForwardRule, load_config
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
    assert config.storage.min_free_mb == 500  # built-in default
    assert config.dicom.ae_title == "FW"  # firmware over default
    assert config.dicom.port == 1002  # site over firmware
    assert config.http.port == 2003  # environment over site
    assert config.http.threads == 5  # command line over environment
    assert config.dicom.max_associations == 16  # an unset flag masks nothing
    assert config.sources == ("defaults", str(firmware), str(site), "environment", "command line")


def test_site_file_from_environment(tmp_path):
    site = write(tmp_path / "site.toml", '[dicom]\nallowed_calling_aes = ["CR1", "US2"]\n')
    config = load_config(environ={"APPLIANCE_CONFIG": str(site)}, firmware_file=None)
    assert config.dicom.allowed_calling_aes == ("CR1", "US2")
    env_list = load_config(environ={"APPLIANCE_DICOM_ALLOWED_CALLING_AES": "A, B"}, firmware_file=None)
    assert env_list.dicom.allowed_calling_aes == ("A", "B")


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
    assert config.http.secret_key == "hunter2"
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
    assert isinstance(hub, Destination) and hub.kind == "dicomweb" and hub.send_window == "22:00-06:00"
    assert hub.password == "pw-from-env" and hub.deidentify is True and hub.max_rate_kbps == 0
    assert config.destination("radiology pacs").port == 11113
    assert config.destinations == (hub, config.destination("radiology pacs"))
    assert config.forward_rules == (ForwardRule(when="urgent", to="hub", priority="urgent"),)
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
    from appliance.config import SECTIONS

    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if typing.get_type_hints(cls)[f.name] is int]


def _bounds(dotted: str) -> tuple[int, int]:
    from appliance.config import SECTIONS

    section, key = dotted.split(".")
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key].metadata["bounds"]


def test_every_integer_key_has_bounds_that_admit_its_default():
    from appliance.config import SECTIONS, TABLE_ARRAYS

    for cls in [*SECTIONS.values(), *TABLE_ARRAYS.values()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            bounds, name = f.metadata["bounds"], f"{cls.__name__}.{f.name}"
            assert (bounds is not None) == (hints[f.name] is int), f"{name}: bounds are declared for integers only, all"
            if bounds is not None:
                assert bounds[0] <= bounds[1], name
                assert bounds[0] <= f.default <= bounds[1], name
            if f.metadata["choices"] is not None and f.default is not dataclasses.MISSING:
                assert f.default in f.metadata["choices"], name
    assert {"storage.min_free_mb", "dicom.port", "dicom.processes", "http.threads", "analyze.workers"} \
        <= set(_integer_keys())
    assert Config() == load_config(environ={}, firmware_file=None)  # the defaults alone are valid


def test_the_firmware_file_agrees_with_the_defaults_and_documents_every_key():
    """Every key in firmware_config/appliance.toml is a field set to the field's default, and every
    field is in the file: set, or commented out where its default depends on the machine (paths)."""
    from appliance.config import FIRMWARE_CONFIG, SECTIONS, _read_toml

    firmware = load_config(environ={}, firmware_file=FIRMWARE_CONFIG)
    assert firmware.sources == ("defaults", str(FIRMWARE_CONFIG))
    assert firmware == Config(), "firmware file and built-in defaults differ: " + json.dumps(
        {s: {k: v for k, v in t.items() if Config().as_dict()[s][k] != v}
         for s, t in firmware.as_dict().items() if isinstance(t, dict)})
    parsed = _read_toml(FIRMWARE_CONFIG)
    assert set(parsed) == set(SECTIONS), "every section is in the firmware file, and only those"
    text = FIRMWARE_CONFIG.read_text()
    for name, cls in SECTIONS.items():
        section_text = text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
        for f in dataclasses.fields(cls):
            if typing.get_type_hints(cls)[f.name] in (Path, typing.Optional[Path]):
                assert f.name not in parsed[name], f"{name}.{f.name}: a path default depends on the machine"
                assert re.search(rf"^# {f.name} = ", section_text, re.M), f"{name}.{f.name} is not documented"
            else:
                assert f.name in parsed[name], f"{name}.{f.name} is not in {FIRMWARE_CONFIG.name}"
    assert firmware.dicom.fast_reactor is True


def test_a_changed_default_is_caught_by_the_firmware_comparison(tmp_path):
    """The comparison above can fail: a firmware file with one value off is not the defaults."""
    from appliance.config import FIRMWARE_CONFIG

    changed = FIRMWARE_CONFIG.read_text().replace("\nmax_attempts = 8\n", "\nmax_attempts = 9\n")
    assert changed != FIRMWARE_CONFIG.read_text()
    assert load_config(environ={}, firmware_file=write(tmp_path / "fw.toml", changed)) != Config()


def test_no_default_path_is_outside_the_project():
    from appliance.config import PROJECT_ROOT, SECTIONS

    defaults = Config()
    for name in SECTIONS:
        for key, value in vars(getattr(defaults, name)).items():
            if isinstance(value, Path):
                assert value.resolve().is_relative_to(PROJECT_ROOT), f"{name}.{key} = {value}"
    assert defaults.analyze.shared_data_dir is None
    with pytest.raises(ConfigError, match=r"^analyze\.shared_data_dir is not set: .*APPLIANCE_ANALYZE_SHARED_DATA_DIR"):
        defaults.analyze.require_shared_data_dir()
    env = load_config(environ={"APPLIANCE_ANALYZE_SHARED_DATA_DIR": "/srv/val"}, firmware_file=None)
    assert env.analyze.require_shared_data_dir() == Path("/srv/val")
    assert load_config(environ={"APPLIANCE_ANALYZE_SHARED_DATA_DIR": ""}, firmware_file=None).analyze.shared_data_dir \
        is None
    with pytest.raises(ConfigError, match=r"^storage\.data_dir \(from environment\): expected a path, got an empty"):
        load_config(environ={"APPLIANCE_STORAGE_DATA_DIR": " "}, firmware_file=None)


def test_quantize_without_shared_data_dir_says_how_to_set_it(tmp_path):
    result = run_cli("models", "quantize", "--model", "cxr-pneumonia", "--data-dir", str(tmp_path / "d"),
                     env={"APPLIANCE_ANALYZE_SHARED_DATA_DIR": ""})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "analyze.shared_data_dir is not set" in result.stderr and "APPLIANCE_ANALYZE_SHARED_DATA_DIR" in result.stderr


@pytest.mark.parametrize("dotted", _integer_keys())
def test_every_integer_key_out_of_range_is_refused_naming_the_key(tmp_path, dotted):
    section, key = dotted.split(".")
    low, high = _bounds(dotted)
    for value in (low - 1, high + 1):
        site = write(tmp_path / "site.toml", f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(site, environ={}, firmware_file=None)
        assert str(info.value).startswith(f"{dotted}: {value} ")
    for value in (low, high):
        config = load_config(write(tmp_path / "ok.toml", f"[{section}]\n{key} = {value}\n"), environ={},
                             firmware_file=None)
        assert getattr(getattr(config, section), key) == value


def test_sections_are_frozen_and_survive_pickling():
    config = load_config(environ={"APPLIANCE_DICOM_PORT": "1104"}, firmware_file=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dicom.port = 1  # type: ignore[misc]
    assert config.dicom.port == 1104
    with pytest.raises(TypeError):
        config["dicom"]  # type: ignore[index]  # no string keys: attributes only
    assert pickle.loads(pickle.dumps(config)) == config  # receiving processes get it pickled
    with pytest.raises(ConfigError, match=r"^dicom\.port: 70000 is not a TCP port"):
        dataclasses.replace(config, dicom=dataclasses.replace(config.dicom, port=70000))


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


def test_the_forwarding_guide_example_loads_and_names_every_destination_key(tmp_path):
    """docs/FORWARDING.md's example is a valid site file and mentions every Destination field."""
    from appliance.config import PROJECT_ROOT

    guide = (PROJECT_ROOT / "docs" / "FORWARDING.md").read_text()
    example = guide.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load_config(write(tmp_path / "site.toml", example), environ={}, firmware_file=None)
    assert [d.name for d in config.destinations] == ["hub", "pacs"] and config.forward_rules
    for f in dataclasses.fields(Destination):
        assert re.search(rf"\b{f.name}\b", example), f"destinations.{f.name} is not in docs/FORWARDING.md's example"

"""contrib/container/compose.yaml fits the image and the config: the identity service builds
from the Containerfile, mounts the image's volume, and every APPSERVICE_ variable it sets (with
the image's own ENV) is a config option that loads into the intended settings. The file is not
run here: the postgres and synapse images come from a registry this machine cannot reach."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appservice.cli import main
from appservice.config import load_config

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "contrib" / "container"
STATE = "/var/lib/matrix-identity-appservice"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((HERE / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _image_env() -> dict[str, str]:
    """The ENV of the Containerfile (one instruction, continued lines)."""
    text = (HERE / "Containerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for pair in line.removeprefix("ENV ").split())


def _substitute(value: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: values[m.group(1)], value)


def test_identity_service_builds_the_containerfile_and_keeps_its_volume() -> None:
    identity = _compose()["services"]["identity"]
    build = identity["build"]
    assert (HERE / build["context"] / build["dockerfile"]).resolve() == HERE / "Containerfile"
    assert f"identity-data:{STATE}" in identity["volumes"]
    assert f"VOLUME {STATE}" in (HERE / "Containerfile").read_text()
    assert "127.0.0.1:8090:8090" in identity["ports"]
    synapse = _compose()["services"]["synapse"]
    assert "./registration:/registration:ro" in synapse["volumes"]
    postgres = _compose()["services"]["postgres"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/identity.sh:ro" in postgres["volumes"]
    assert (HERE / "postgres-init.sh").stat().st_mode & 0o111


def test_environment_names_config_options_and_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = {"POSTGRES_PASSWORD": "pw", "AS_TOKEN": "a" * 32, "HS_TOKEN": "h" * 32}
    values["SERVER_NAME"] = "example.org"
    environ = _image_env()
    for name, value in _compose()["services"]["identity"]["environment"].items():
        environ[name] = _substitute(str(value), values)
    path = tmp_path / "config.yaml"
    assert main(["generate-config", "-c", str(path)]) == 0
    with caplog.at_level(logging.WARNING):
        config = load_config(path, environ)
    assert not [r for r in caplog.records if "environment variable" in r.getMessage()]
    assert config.database.url == "postgres://identity:pw@postgres:5432/identity"
    assert config.listen.host == "0.0.0.0"
    service = config.appservice
    assert service.enabled
    assert (service.as_token, service.hs_token) == (values["AS_TOKEN"], values["HS_TOKEN"])
    assert service.homeserver_url == "http://synapse:8008"
    assert service.homeserver_domain == "example.org"
    assert service.url == "http://identity:8091"
    assert service.listen.host == "0.0.0.0"
    assert service.listen.port == 8091

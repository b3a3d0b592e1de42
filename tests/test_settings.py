"""Settings: tokens are secrets (SecretStr) that every reader unwraps, and nothing else shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh import Settings
from agentmesh.security.files import ADMIN_TOKEN_FILE, JOIN_TOKEN_FILE, admin_token
from agentmesh.security.workload import WorkloadIdentity


def test_tokens_never_show_in_a_repr_or_a_dump(tmp_path: Path) -> None:
    settings = Settings(token="admin-s3cret", join_token="amt1.pin.j0in", data_dir=tmp_path)
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "admin-s3cret" not in shown
        assert "j0in" not in shown
    assert admin_token(settings) == "admin-s3cret"
    assert WorkloadIdentity.for_caller(settings, "client")._token() == "amt1.pin.j0in"


def test_tokens_come_from_the_environment_else_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ADMIN_TOKEN_FILE).write_text("from-file\n")
    (tmp_path / JOIN_TOKEN_FILE).write_text("amt1.pin.file\n")
    monkeypatch.setenv("AGENTMESH_DATA_DIR", str(tmp_path))
    for name in ("AGENTMESH_TOKEN", "AGENTMESH_JOIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert admin_token(settings) == "from-file"
    assert WorkloadIdentity.for_caller(settings, "client")._token() == "amt1.pin.file"

    monkeypatch.setenv("AGENTMESH_TOKEN", "from-env")
    monkeypatch.setenv("AGENTMESH_JOIN_TOKEN", "amt1.pin.env")
    settings = Settings()
    assert settings.token is not None
    assert settings.token.get_secret_value() == "from-env"
    assert admin_token(settings) == "from-env"
    assert WorkloadIdentity.for_caller(settings, "client")._token() == "amt1.pin.env"

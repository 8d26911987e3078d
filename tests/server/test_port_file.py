"""`cnnserve serve --port-file`: written once serving, removed when the process exits."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.deploy import stop_process
from tests.support.deploy_server import running_server
from tests.support.models import write_test_model


def test_the_port_file_is_removed_on_exit(model_repo: Path, tmp_path: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    port_file = tmp_path / "ports.json"
    with running_server(model_repo, tmp_path) as server:
        ports = json.loads(port_file.read_text())
        assert ports["grpc_port"] == server.grpc_port
        assert ports["metrics_port"] == server.metrics_port
        assert stop_process(server.process) == 0
    # A stale file would send the next client to a port nobody listens on.
    assert not port_file.exists()

"""Server settings: flag over CNNSERVE_* variable over default; --help names every variable;
JSON logs are valid JSON."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cnnserve.common.errors import CnnserveError
from cnnserve.server.process.logs import JsonFormatter
from cnnserve.server.process.settings import Settings, env_of, fields


def test_defaults_apply_when_nothing_is_given() -> None:
    settings = Settings.build({}, {})
    assert settings == Settings()
    assert (settings.grpc_port, settings.metrics_port) == (8001, 8002)
    assert settings.http_port == 8000  # REST, Triton's default port
    assert settings.max_message_bytes == 256 * 1024 * 1024


def test_a_flag_wins_over_its_variable_which_wins_over_the_default() -> None:
    env = {"CNNSERVE_GRPC_PORT": "9001", "CNNSERVE_METRICS_PORT": "9002",
           "CNNSERVE_MODELS": "a, b", "CNNSERVE_WARMUP": "false",
           "CNNSERVE_TLS_CERT": "/c.pem", "CNNSERVE_TLS_KEY": "/k.pem"}
    settings = Settings.build({"grpc_port": 7001, "metrics_port": None}, env)
    assert settings.grpc_port == 7001
    assert settings.metrics_port == 9002
    assert settings.models == ("a", "b") and settings.warmup is False
    assert settings.tls_cert == Path("/c.pem")
    assert Settings.build({"models": ["x"]}, env).models == ("x",)


def test_thread_settings_default_to_the_cores_and_can_be_set() -> None:
    assert (Settings().intra_op_threads, Settings().execution_workers) == (None, None)
    settings = Settings.build({"execution_workers": 3},
                              {"CNNSERVE_INTRA_OP_THREADS": "2",
                               "CNNSERVE_EXECUTION_WORKERS": "8"})
    assert (settings.intra_op_threads, settings.execution_workers) == (2, 3)


@pytest.mark.parametrize(("env", "message"), [
    ({"CNNSERVE_GRPC_PORT": "eighty"}, "CNNSERVE_GRPC_PORT='eighty'"),
    ({"CNNSERVE_DEVICE": "tpu"}, "must be one of cpu, cuda, auto"),
    ({"CNNSERVE_GRPC_PORT": "70000"}, "--grpc-port must be in 0..65535"),
    ({"CNNSERVE_HTTP_PORT": "-2"}, "--http-port must be in 0..65535, or -1 for no REST"),
    ({"CNNSERVE_TLS_CERT": "/c.pem"}, "--tls-cert and --tls-key go together"),
    ({"CNNSERVE_TLS_CA": "/ca.pem"}, "--tls-ca (mutual TLS) needs --tls-cert"),
    ({"CNNSERVE_WARMUP": "maybe"}, "CNNSERVE_WARMUP='maybe'"),
    ({"CNNSERVE_EXECUTION_WORKERS": "0"}, "--execution-workers must be positive"),
    ({"CNNSERVE_INTRA_OP_THREADS": "-1"}, "--intra-op-threads must be >= 0"),
])
def test_bad_values_are_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(CnnserveError) as info:
        Settings.build({}, env)
    assert message in str(info.value)


def test_http_port_minus_one_turns_rest_off() -> None:
    assert Settings.build({"http_port": -1}, {}).http_port == -1
    assert Settings.build({}, {"CNNSERVE_HTTP_PORT": "0"}).http_port == 0


def test_the_token_never_shows_in_the_settings_repr() -> None:
    assert "s3cret" not in repr(Settings(token="s3cret"))


def test_help_lists_every_flag_with_its_environment_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "cnnserve.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for field in fields():
        assert f"[env {env_of(field.name)}]" in text, field.name
    for flag in ("--repository", "--model", "--grpc-port", "--metrics-port", "--tls-ca",
                 "--token", "--grace-period", "--max-message-bytes", "--log-format"):
        assert flag in text


def test_json_log_lines_are_json_with_extras_and_exceptions() -> None:
    try:
        raise ValueError('bad "quote"\nnext line')
    except ValueError:
        record = logging.LogRecord("cnnserve.x", logging.ERROR, __file__, 1, "failed: %s",
                                   ("a\"b",), sys.exc_info())
    record.grpc_port = 8001
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == 'failed: a"b' and entry["level"] == "ERROR"
    assert entry["logger"] == "cnnserve.x" and entry["grpc_port"] == 8001
    assert 'bad "quote"' in entry["exception"] and entry["time"].endswith("+00:00")

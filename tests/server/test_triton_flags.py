"""`cnnserve serve` takes tritonserver's spellings where the meaning is the same, and refuses
the tritonserver flags it does not support with a message saying so (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cnnserve.cli import build_parser
from cnnserve.client import InferenceClient
from cnnserve.common.errors import UsageError
from cnnserve.server.process.cli import _flags
from cnnserve.server.process.settings import Settings
from cnnserve.server.process.triton_flags import UNSUPPORTED
from tests.support.deploy_server import running_server
from tests.support.models import write_test_model


def settings_of(*argv: str) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return Settings.build(_flags(args), {})


@pytest.mark.parametrize(("triton", "ours"), [
    (("--model-repository", "/r"), ("--repository", "/r")),
    (("/r",), ("--repository", "/r")),
    (("--model-control-mode=explicit",), ("--control-mode", "explicit")),
    (("--load-model", "a", "--load-model=b"), ("--model", "a", "--model", "b")),
    (("--repository-poll-secs", "7"), ("--poll-interval", "7")),
    (("--exit-timeout-secs=3",), ("--grace-period", "3")),
    (("--strict-readiness=false",), ("--no-strict-readiness",)),
    (("--strict-readiness", "false"), ("--strict-readiness=off",)),
])
def test_a_triton_spelling_sets_what_ours_sets(triton: tuple[str, ...],
                                               ours: tuple[str, ...]) -> None:
    assert settings_of(*triton) == settings_of(*ours) != settings_of()


def test_two_different_repositories_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="two repositories"):
        settings_of("--repository", "/a", "/b")
    assert settings_of("--repository", "/a", "/a").repository == Path("/a")


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED))
def test_every_unsupported_triton_flag_is_refused_saying_so(
        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", f"{flag}=1"])
    assert exit_.value.code == 2
    assert f"{flag} is a Triton flag cnnserve does not support: " in capsys.readouterr().err


def test_the_command_exits_2_for_an_unsupported_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "cnnserve.cli", "serve", "models",
                             "--model-load-thread-count", "4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--model-load-thread-count is a Triton flag cnnserve does not support" \
        in result.stderr


def test_a_server_started_with_triton_flags(model_repo: Path, tmp_path: Path) -> None:
    """tritonserver's command line, as a user would carry it over, serves as it says."""
    write_test_model(model_repo, "linear", 1)
    write_test_model(model_repo, "idle", 1)
    write_test_model(model_repo, "broken", 1, corrupt=True)
    args = ["--model-repository", str(model_repo), "--model-control-mode=explicit",
            "--load-model", "linear", "--load-model", "broken", "--strict-readiness=false"]
    with running_server(model_repo, tmp_path, repository_args=args) as server, \
            InferenceClient(server.address, timeout=10) as client:
        states = {m.name: m.state for m in client.repository_index()}
        assert states["linear"] == "READY" and states["broken"] == "UNAVAILABLE"
        assert states.get("idle", "") != "READY"   # explicit: only what --load-model named
        # Not strict: ready although a model asked for failed (strict would say not ready).
        assert client.ready()

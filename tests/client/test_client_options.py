"""The client commands' options classes generate their flags, defaults and variables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cnnserve.client.options import (
    DEFAULT_URL,
    ENV_PREFIX,
    BatchOptions,
    ClassifyOptions,
    ConnectionOptions,
)
from cnnserve.common.errors import CnnserveError
from cnnserve.common.options import add_flags, flag_of, option_fields


def _parse(cls: type[ConnectionOptions], argv: list[str],
           environ: dict[str, str] | None = None) -> ConnectionOptions:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls, env_prefix=ENV_PREFIX)
    return cls.build(vars(parser.parse_args(argv)), environ or {})


BATCH = ["--model", "m", "--input", "x.npy", "--output", "out.jsonl"]


def test_both_commands_share_the_connection_flags_with_their_own_defaults() -> None:
    shared = {f.name for f in option_fields(ConnectionOptions)}
    assert shared <= {f.name for f in option_fields(BatchOptions)}
    assert shared <= {f.name for f in option_fields(ClassifyOptions)}
    batch = _parse(BatchOptions, BATCH)
    classify = _parse(ClassifyOptions, ["--model", "m", "a.png", "b.png"])
    assert (batch.timeout, batch.retries) == (60.0, 8)
    assert (classify.timeout, classify.retries) == (30.0, 3)
    assert isinstance(classify, ClassifyOptions)
    assert classify.images == (Path("a.png"), Path("b.png"))
    assert batch.url == classify.url == (DEFAULT_URL,)
    assert flag_of(BatchOptions, "model_version") == "--model-version"


def test_url_and_token_come_from_the_environment_unless_a_flag_or_empty() -> None:
    env = {"CNNSERVE_URL": "h:1", "CNNSERVE_TOKEN": "secret", "CNNSERVE_MODEL": "ignored",
           "CNNSERVE_TIMEOUT": "1", "CNNSERVE_TLS_CERT": "server.pem"}
    from_env = _parse(BatchOptions, BATCH, env)
    assert (from_env.url, from_env.token, from_env.model) == (("h:1",), "secret", "m")
    assert (from_env.timeout, from_env.tls_cert) == (60.0, None)  # server variables stay out
    flagged = _parse(BatchOptions, [*BATCH, "--url", "f:2", "--token", "t"], env)
    assert (flagged.url, flagged.token) == (("f:2",), "t")
    empty = _parse(BatchOptions, BATCH, {"CNNSERVE_URL": "", "CNNSERVE_TOKEN": ""})
    assert (empty.url, empty.token) == ((DEFAULT_URL,), None)
    assert "secret" not in repr(from_env)


def test_flags_keep_their_names_and_meaning() -> None:
    options = _parse(BatchOptions, [*BATCH, "--no-progress", "--retry-failed", "--tls",
                                     "--format", "csv", "--batch-size", "8",
                                     "--concurrency", "2", "--top-k", "1"])
    assert isinstance(options, BatchOptions)
    assert (options.progress, options.retry_failed, options.tls) == (False, True, True)
    assert (options.output_format, options.batch_size, options.concurrency,
            options.top_k) == ("csv", 8, 2, 1)
    assert options.output == Path("out.jsonl")
    csv = _parse(BatchOptions, [*BATCH[:-1], "o.CSV"])
    assert isinstance(csv, BatchOptions) and csv.output_format == "csv"


def test_required_flags_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(BatchOptions, ["--model", "m", "--input", "x"])
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--retries", "-1"], "--retries must be at least 0"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
])
def test_values_out_of_range_name_their_flag(flags: list[str], message: str) -> None:
    with pytest.raises(CnnserveError, match=message):
        _parse(BatchOptions, [*BATCH, *flags])


def test_tls_files_become_a_tls_config() -> None:
    from cnnserve.client._channel import TlsConfig

    assert _parse(BatchOptions, BATCH).tls_setting() is False
    tls = _parse(BatchOptions, [*BATCH, "--tls-ca", "ca.pem"]).tls_setting()
    assert isinstance(tls, TlsConfig) and tls.ca_cert == Path("ca.pem")


def test_url_repeats_for_the_ray_engine_only() -> None:
    two = _parse(BatchOptions, [*BATCH, "--engine", "ray", "--url", "a:1", "--url", "b:2"])
    assert two.url == ("a:1", "b:2")
    from_env = _parse(BatchOptions, [*BATCH, "--engine", "ray"], {"CNNSERVE_URL": "a:1, b:2"})
    assert from_env.url == ("a:1", "b:2")
    with pytest.raises(CnnserveError, match="several --url need --engine ray"):
        _parse(BatchOptions, [*BATCH, "--url", "a:1", "--url", "b:2"])
    with pytest.raises(CnnserveError, match="talks to one server"):
        _ = _parse(ClassifyOptions, ["--model", "m", "--url", "a:1", "--url", "b:2",
                                     "x.png"]).address
    assert BatchOptions(model="m", input="x", output=Path("o"), url="h:3").url == ("h:3",)


@pytest.mark.parametrize("flags", [["--repository", "models"], ["--ray-address", "h:6379"],
                                   ["--ray-actors", "2"], ["--format", "parquet"]])
def test_ray_flags_need_the_ray_engine(flags: list[str]) -> None:
    with pytest.raises(CnnserveError, match="need --engine ray"):
        _parse(BatchOptions, [*BATCH, *flags])
    options = _parse(BatchOptions, [*BATCH, "--engine", "ray", *flags])
    assert isinstance(options, BatchOptions) and options.engine == "ray"


def test_the_ray_engine_without_ray_names_the_install_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A finder that hides ray, as on a machine without the batch-ray extra.
    script = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from cnnserve.cli import main
sys.exit(main(sys.argv[1:]))
"""
    result = subprocess.run([sys.executable, "-c", script, "batch", "--engine", "ray",
                             "--model", "m", "--input", "x.npy", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--engine ray needs Ray Data" in result.stderr
    assert "pip install 'cnnserve[batch-ray]'" in result.stderr

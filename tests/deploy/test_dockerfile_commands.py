"""Run what the Dockerfiles run, outside Docker, in fresh virtual environments.

No Docker engine runs here, so each image's build is emulated from its Dockerfile: the COPY
instructions of the build stage copy the same files into a temporary build folder, its RUN
lines run there with ``$VENV`` pointing at a new virtual environment, and the final stage's
ENV, ENTRYPOINT/CMD and HEALTHCHECK run against that environment. A missing file in a COPY,
a missing dependency, a broken entrypoint or probe fails here instead of at a user's deploy.
Installs use PyPI (constraints.txt pins) and /opt/wheels; the server image must not need torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.deploy import (
    DEPLOY,
    ROOT,
    Stage,
    free_port,
    healthcheck_command,
    read_stages,
    stop_process,
    wait_until,
)
from tests.support.models import write_test_model

pytestmark = pytest.mark.slow

IMAGE_VENV = "/opt/venv"


def emulate_build(stage: Stage, workdir: Path) -> Path:
    """Run a build stage's COPY and RUN lines under ``workdir``; return the virtual env path.

    WORKDIR maps to ``workdir/src``; ``$VENV`` (the image's /opt/venv) to ``workdir/venv``.
    RUN lines run with bash like Docker's default shell form (sh -c), with ``python`` on PATH
    being this interpreter (the image's is python:3.11 too).
    """
    src, venv, bin_dir = workdir / "src", workdir / "venv", workdir / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    src.mkdir()
    env = {**os.environ, **stage.env({"PATH": f"{bin_dir}:{os.environ['PATH']}"})}
    assert env["VENV"] == IMAGE_VENV
    env["VENV"] = str(venv)
    env.pop("PIP_NO_CACHE_DIR")  # the image build keeps no cache; a test run may reuse one
    env.pop("VIRTUAL_ENV", None)
    for inst in stage.instructions:
        if inst.keyword == "COPY":
            *sources, dest = inst.args.split()
            for source in sources:
                origin, target = ROOT / source, src / dest
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:  # COPY a b ./ puts files into the folder; COPY a ./b names the file
                    shutil.copy2(origin, target / origin.name if dest.endswith("/") else target)
        elif inst.keyword == "RUN":
            assert inst.exec_form is None, "RUN lines use the shell form"
            result = subprocess.run(["sh", "-c", inst.args], cwd=src, env=env,
                                    capture_output=True, text=True, timeout=400)
            assert result.returncode == 0, (
                f"RUN {inst.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert (venv / "bin" / "python").exists(), "the build stage made no virtual environment"
    return venv


def image_env(stage: Stage, venv: Path, **overrides: str) -> dict[str, str]:
    """The final stage's environment with the image's /opt/venv mapped to ``venv``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env.pop("VIRTUAL_ENV", None)
    env.update(stage.env({"PATH": os.environ["PATH"]}))
    env["PATH"] = env["PATH"].replace(f"{IMAGE_VENV}/bin", str(venv / "bin"))
    assert env["PATH"].startswith(str(venv / "bin")), "the image puts its venv first on PATH"
    env.update(overrides)
    return env


def in_venv(venv: Path, *code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "\n".join(code)],
                          capture_output=True, text=True, timeout=120)


def test_server_image_installs_without_torch_serves_is_healthy_and_drains(
        tmp_path: Path) -> None:
    stages = read_stages(DEPLOY / "Dockerfile.server")
    final = stages["server"]
    (copy,) = [i for i in final.all("COPY") if "from" in i.flags]
    assert copy.args.split() == [IMAGE_VENV, IMAGE_VENV]
    venv = emulate_build(stages[copy.flags["from"]], tmp_path / "build")

    found = in_venv(venv, "import importlib.util as u",
                    "print([m for m in ('torch', 'onnx', 'PIL') if u.find_spec(m)])")
    assert found.stdout.strip() == "[]", "the server image carries training/client packages"

    repository = tmp_path / "models"
    write_test_model(repository, "tiny", 1)
    grpc_port, metrics_port = free_port(), free_port()
    env = image_env(final, venv, CNNSERVE_REPOSITORY=str(repository),
                    CNNSERVE_GRPC_PORT=str(grpc_port), CNNSERVE_METRICS_PORT=str(metrics_port),
                    CNNSERVE_HTTP_PORT=str(free_port()),
                    CNNSERVE_HOST="127.0.0.1")
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form is not None, "exec-form ENTRYPOINT"
    cmd = final.last("CMD")
    command = entrypoint.exec_form + (cmd.exec_form or [] if cmd else [])
    command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
    assert command[0].startswith(str(venv)), f"{command[0]} is not the image's"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        check = healthcheck_command(final)

        def healthy() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"the entrypoint exited {server.returncode}:\n"
                                     f"{log.read_text()}")
            result = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True,
                                    text=True, timeout=30)
            return result.returncode == 0 and result.stdout.startswith("SERVING")
        wait_until(healthy, 90, "the HEALTHCHECK probe to report SERVING", interval_s=0.5)

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()
        after = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert after.returncode == 1, "the probe still passes after the server stopped"
    finally:
        stop_process(server)


def test_client_image_installs_without_torch_or_onnxruntime_and_runs_batch(
        tmp_path: Path) -> None:
    stages = read_stages(DEPLOY / "Dockerfile.client")
    final = stages["client"]
    (copy,) = [i for i in final.all("COPY") if "from" in i.flags]
    venv = emulate_build(stages[copy.flags["from"]], tmp_path / "build")
    found = in_venv(venv, "import importlib.util as u",
                    "print([m for m in ('torch', 'onnxruntime') if u.find_spec(m)])")
    assert found.stdout.strip() == "[]"
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form == ["cnnserve"]
    assert cmd is not None and cmd.exec_form is not None
    env = image_env(final, venv)
    command = [str(venv / "bin" / "cnnserve"), *cmd.exec_form]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    import yaml
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for flag in (a for a in compose["services"]["batch"]["command"] if a.startswith("--")):
        assert flag in result.stdout, f"docker-compose.yml's batch job passes {flag}"


@pytest.mark.parametrize(("dockerfile", "extra", "index_args"), [
    # Docker gets torch from the PyTorch CPU index; here the same wheel is in /opt/wheels.
    ("Dockerfile.trainer", ".[train]", ["--find-links", "/opt/wheels"]),
    ("Dockerfile.server", ".[gpu]", []),
])
def test_other_images_dependencies_resolve(tmp_path: Path, dockerfile: str, extra: str,
                                           index_args: list[str]) -> None:
    """The trainer's and the GPU server's installs resolve against constraints.txt.

    A dry run (metadata only): installing torch or onnxruntime-gpu for real takes minutes.
    """
    runs = [i.args for s in read_stages(DEPLOY / dockerfile).values() for i in s.all("RUN")
            if f'"{extra}"' in i.args]
    assert len(runs) == 1, f"{dockerfile} should install {extra} once: {runs}"
    assert "-c constraints.txt" in runs[0]
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    for folder in ("common", "server", "proto", "client", "training"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "-c", "constraints.txt", *index_args, extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_trainer_command_skips_training_when_the_repository_has_a_model(tmp_path: Path) -> None:
    stage = read_stages(DEPLOY / "Dockerfile.trainer")["trainer"]
    cmd = stage.last("CMD")
    assert cmd is not None and cmd.exec_form == ["prepare-model.sh"]
    copies = {i.args.split()[-1]: i.args.split()[0] for i in stage.all("COPY")}
    script = ROOT / copies["/usr/local/bin/prepare-model.sh"]
    repository = tmp_path / "models"
    write_test_model(repository, "fashion-cnn", 1)
    env = {**os.environ, **stage.env({"PATH": os.environ["PATH"]}),
           "CNNSERVE_REPOSITORY": str(repository), "CNNSERVE_RUN_DIR": str(tmp_path / "runs")}
    env["PATH"] = "/usr/bin:/bin"  # no cnnserve on PATH: it must not even try to train
    result = subprocess.run([str(script)], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to train" in result.stdout
    assert not (tmp_path / "runs").exists()

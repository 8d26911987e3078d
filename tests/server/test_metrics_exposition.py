"""/metrics of a real `cnnserve serve`: valid for promtool, and exactly what the README's
metrics table documents (name, type, labels, Triton equivalent), so the docs cannot drift."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deploy_server import drive_requests, running_server
from tests.support.models import write_test_model

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /metrics text of a server that answered good and bad requests and failed a load."""
    work = tmp_path_factory.mktemp("metrics")
    repo = work / "models"
    write_test_model(repo, "linear", 1)
    write_test_model(repo, "broken", 1, corrupt=True)
    with running_server(repo, work, ["--metrics-names", "triton",
                                     "--strict-readiness=false"]) as server:
        drive_requests(server.address, "linear", 3)
        yield server.metrics_text()


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/bootstrap.sh installs Debian's prometheus")
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


def without_triton_names(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines()
                   if not re.match(r"(# (HELP|TYPE) )?nv_", line))


def test_cnnserve_names_pass_promtool(exposition: str) -> None:
    result = promtool(without_triton_names(exposition))
    assert result.returncode == 0, result.stdout + result.stderr


def test_triton_names_parse_and_break_only_prometheus_naming_lints(exposition: str) -> None:
    result = promtool(exposition)
    problems = (result.stdout + result.stderr).strip().splitlines()
    # Triton's names (microseconds, *_count gauges) are Triton's, lints and all.
    assert problems and all(p.startswith("nv_") for p in problems), problems
    assert all("abbreviated units" in p or '"_count" suffix' in p for p in problems), problems


def test_no_created_series(exposition: str) -> None:
    assert "_created" not in exposition


def exposed(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name as written on /metrics -> (type, label names)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        counter_total = family.type == "counter" and any(
            s.name.endswith("_total") for s in family.samples)
        name = family.name + "_total" if counter_total else family.name
        out[name] = (family.type, labels)
    return out


def documented() -> tuple[dict[str, tuple[str, frozenset[str]]], set[str]]:
    """The README metrics table: name -> (type, labels), and every Triton name it gives."""
    section = README.read_text().split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    triton: set[str] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].startswith("`"):
            continue
        labels = frozenset() if cells[2] == "-" else frozenset(
            c.strip() for c in cells[2].split(","))
        rows[cells[0].strip("`")] = (cells[1], labels)
        triton.update(re.findall(r"`(nv_[a-z_]+)`", cells[4]))
    return rows, triton


def test_the_readme_documents_every_metric_exactly(exposition: str) -> None:
    live = exposed(exposition)
    docs, triton_docs = documented()
    ours = {k: v for k, v in live.items() if not k.startswith("nv_")}
    assert set(docs) == set(ours), (f"undocumented: {sorted(set(ours) - set(docs))}, "
                                    f"documented but absent: {sorted(set(docs) - set(ours))}")
    for name, (kind, labels) in docs.items():
        assert ours[name] == (kind, labels), f"{name}: README says {kind} {sorted(labels)}, " \
                                             f"/metrics has {ours[name]}"
    assert triton_docs == {k for k in live if k.startswith("nv_")}
    for name in triton_docs:
        assert live[name][1] == {"model", "version"}, name


def test_triton_names_only_when_asked() -> None:
    from prometheus_client import generate_latest

    from cnnserve.server.telemetry.metrics import Metrics

    plain = generate_latest(Metrics().registry).decode()
    assert "nv_inference" not in plain and "process_cpu_seconds_total" in plain
    assert "nv_inference_count" in generate_latest(Metrics(triton_names=True).registry).decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_per_model_gauges_show_loaded_versions_and_their_state(exposition: str) -> None:
    assert sample(exposition, "cnnserve_model_loaded_versions", model="linear") == 1.0
    assert sample(exposition, "cnnserve_model_loaded_versions", model="broken") == 0.0
    assert sample(exposition, "cnnserve_model_state", model="linear", version="1",
                  state="READY") == 1.0
    assert sample(exposition, "cnnserve_model_state", model="broken", version="1",
                  state="UNAVAILABLE") == 1.0


def test_triton_counts_agree_with_cnnserve_counts(exposition: str) -> None:
    """3 good requests of 2 rows, one bad one (wrong shape) for the linear model."""
    mv = {"model": "linear", "version": "1"}
    assert sample(exposition, "nv_inference_request_success", **mv) == 3.0
    assert sample(exposition, "nv_inference_request_failure", **mv) == 1.0
    assert sample(exposition, "nv_inference_count", **mv) == \
        sample(exposition, "cnnserve_inferences_total", **mv) == 6.0
    assert sample(exposition, "nv_inference_exec_count", **mv) == \
        sample(exposition, "cnnserve_executions_total", **mv)
    compute_s = sample(exposition, "cnnserve_compute_duration_seconds_sum", **mv)
    assert compute_s is not None
    assert sample(exposition, "nv_inference_compute_infer_duration_us", **mv) == \
        pytest.approx(compute_s * 1e6)

"""The Ray engine's blocks and actor work, without Ray: layout, resume, records, formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.client.batch.raydata.blocks import Layout, encode_part, prepare, read_finished
from cnnserve.client.batch.raydata.predict import classify_chunk, info_from_config
from cnnserve.client.batch.results import Record, format_header
from cnnserve.client.batch.sources import FileSource
from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import write_atomically
from cnnserve.common.repository import Normalization, TensorSpec, VersionConfig

CONFIG = VersionConfig(name="m", inputs=(TensorSpec("input", "FP32", (-1, 1, 2, 2)),),
                       outputs=(TensorSpec("logits", "FP32", (-1, 3)),), max_batch_size=8,
                       labels=("a", "b", "c"), normalization=Normalization((0.5,), (0.25,)))


def test_blocks_are_fixed_and_a_rerun_finds_the_finished_ones(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out", "csv", block_size=4, total=10)
    assert layout.blocks == 3 and list(layout.items(2)) == [8, 9]
    identity = {"input": "x", "items": 10, "block_size": 4}
    assert prepare(layout, identity) == set()
    records = [Record(str(i), (("a", 0, 0.5),), "b", 1) for i in range(4)]
    write_atomically(layout.part(0), encode_part(records, "csv", header=True))
    write_atomically(layout.part(1), encode_part(records[:1], "csv", header=False))
    assert prepare(layout, identity) == {0, 1}
    resumed = read_finished(layout, {0, 1})
    assert (len(resumed.done), resumed.labelled, resumed.correct) == (4, 5, 0)
    assert layout.part(0).read_text().startswith(format_header("csv"))
    assert not layout.part(1).read_text().startswith("id,")
    with pytest.raises(CnnserveError, match="block_size differ"):
        prepare(Layout(tmp_path / "out", "csv", 5, 10), {**identity, "block_size": 5})


def test_an_actor_records_unreadable_images_and_failed_runs_as_errors(tmp_path: Path) -> None:
    info = info_from_config(CONFIG, "1")
    assert (info.mean, info.std, info.label(2)) == ((0.5,), (0.25,), "c")
    Image.fromarray(np.full((2, 2), 255, np.uint8)).save(tmp_path / "white.png")
    (tmp_path / "broken.png").write_bytes(b"no")
    source = FileSource([tmp_path / "broken.png", tmp_path / "white.png"], tmp_path, info)
    seen: list[np.ndarray] = []

    def run(inputs: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(inputs)
        return {"logits": np.array([[0.0, 3.0, 1.0]] * len(inputs), np.float32)}

    latencies: list[float] = []
    records = classify_chunk(source, info, [0, 1], run, 2, latencies)
    assert records[0].error is not None and "broken.png" in records[0].error
    assert [t[0] for t in records[1].top_k] == ["b", "c"] and len(latencies) == 1
    np.testing.assert_array_equal(seen[0], np.full((1, 1, 2, 2), 2.0, np.float32))  # (1-.5)/.25

    def refuse(inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("server said no")

    failed = classify_chunk(source, info, [1], refuse, 2, latencies)
    assert failed[0].error == "server said no"
    lines = encode_part([*records, *failed], "jsonl", header=True).decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["broken.png", "white.png", "white.png"]


def test_parquet_parts_hold_the_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [Record("x", (("a", 0, 0.75), ("b", 1, 0.25)), "a", 0),
               Record("y", error="bad image")]
    table = pq.read_table(pa.BufferReader(encode_part(records, "parquet", header=True)))
    rows = table.to_pylist()
    assert rows[0]["label"] == "a" and rows[0]["top_k_probabilities"] == [0.75, 0.25]
    assert rows[1]["index"] is None and rows[1]["error"] == "bad image"

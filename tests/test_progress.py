"""What a run records: metrics.jsonl (cut back to the restored step on resume) and TensorBoard event files."""

import struct

from tensorboardX.proto import event_pb2

from jsft.progress import MetricsWriter, read_metrics


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TFRecord event files under log_dir (length, crc, event, crc)."""
    scalars = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, report_to=["jsonl", "tensorboard"])
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "learning_rate": 1e-3, "num_tokens": 64})
    writer.close()
    assert [m["loss"] for m in read_metrics(tmp_path)] == [1.0, 0.5, 1.0 / 3]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [round(v, 6) for _, v in scalars["loss"]] == [1.0, 0.5, round(1.0 / 3, 6)]
    assert set(scalars) == {"loss", "learning_rate", "num_tokens"}


def test_resume_keeps_jsonl_lines_up_to_the_restored_step(tmp_path):
    writer = MetricsWriter(tmp_path, report_to=["jsonl"])
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    writer = MetricsWriter(tmp_path, report_to=["jsonl"], resume_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert not (tmp_path / "tensorboard").exists()  # report_to without tensorboard writes no event files

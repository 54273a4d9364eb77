"""Read an offline W&B run back from its transaction log (run-<id>.wandb), with W&B's own protobuf
schema: the file is a LevelDB-style log (7-byte header ':W&B' + magic + version, then 32 KiB
blocks of records: crc32c (4), length (2, little-endian), type (1: full, 2: first, 3: middle,
4: last), payload), each payload one serialized `wandb.proto.wandb_internal_pb2.Record`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: str | Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # too small for a record header: padding up to the next block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def read_run(run_file: str | Path) -> dict:
    """{'config': {key: value}, 'history': [{key: value, ...} per logged step], 'summary': {...},
    'metrics': {name: step_metric} from define_metric}."""
    from wandb.proto import wandb_internal_pb2 as pb

    config, history, summary, metrics = {}, [], {}, {}

    def key_of(item):
        return ".".join(item.nested_key) if item.nested_key else item.key

    for payload in iter_payloads(run_file):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):
            for item in (rec.config if kind == "config" else rec.run.config).update:
                config[key_of(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({key_of(item): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                summary[key_of(item)] = json.loads(item.value_json)
        elif kind == "metric":
            metrics[rec.metric.name] = rec.metric.step_metric
    return {"config": config, "history": history, "summary": summary, "metrics": metrics}


def find_run_files(run_dir: str | Path) -> list[Path]:
    """Every offline transaction log under <run_dir>/wandb, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))

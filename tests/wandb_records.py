"""Read the records of a W&B run file (`<run>/wandb/offline-run-*/run-<id>.wandb`) for tests.

wandb >= 0.2x writes the file from its Go core and ships no Python reader any more (the old
`wandb.sdk.internal.datastore`), so the format is read here: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then LevelDB-log blocks of 32 KiB holding chunks (crc32, uint16 length, type: 1 full,
2 first, 3 middle, 4 last), each record a `wandb.proto.wandb_internal_pb2.Record`. The header check and
the chunk types fail loudly when wandb changes the format.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """Every `Record` of a run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[: len(_HEADER)] == _HEADER, f"{path}: not a W&B run file of the known format"
    records, parts, pos = [], [], len(_HEADER)
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"{path}: unknown chunk type {kind} at {pos}"
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        parts.append(chunk)
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records

"""The columns of a result (single file or shard) and its ids read back exactly."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from imvec.extract.arrow import decode_raw, fixed_size_lists, raw_only, strings
from imvec.extract.fingerprint import FINGERPRINT_FIELDS, Fingerprints

__all__ = ["METADATA_KEY", "ids_of", "output_schema", "output_table"]

METADATA_KEY = b"imvec"


def output_schema(dim: int, record: dict) -> pa.Schema:
    """id, path, feature; ``id_bytes``: the exact bytes of an id that is not UTF-8 (null
    otherwise; ``id`` then shows it as :func:`arrow.display`); the input's fingerprint."""
    return pa.schema(
        [pa.field("id", pa.string(), nullable=False), pa.field("path", pa.string(), False),
         pa.field("feature", pa.list_(pa.float32(), dim), False),
         pa.field("id_bytes", pa.binary()), *FINGERPRINT_FIELDS],
        metadata={METADATA_KEY: json.dumps(record, sort_keys=True).encode(),
                  b"imvec.model": record["model"]["handle"].encode(),
                  b"imvec.weights_sha256": record["model"]["weights_sha256"].encode(),
                  b"imvec.preprocessing": json.dumps(record["preprocessing"]).encode()})


def output_table(ids: Sequence[str], paths: Sequence[str], values: np.ndarray,
                 prints: Fingerprints, schema: pa.Schema) -> pa.Table:
    return pa.table([strings(ids), strings(paths), fixed_size_lists(values), raw_only(ids),
                     *prints.arrays()], schema=schema)


def ids_of(table: pa.Table) -> list[str]:
    """Ids as the file system names them (``id_bytes`` where an id is not UTF-8)."""
    ids = table.column("id").to_pylist()
    if "id_bytes" in table.column_names and table.column("id_bytes").null_count < len(ids):
        exact = decode_raw(table.column("id_bytes").fill_null(b""))
        ids = [e if b is not None else i for i, e, b in
               zip(ids, exact, table.column("id_bytes").to_pylist(), strict=True)]
    return ids

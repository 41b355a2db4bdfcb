"""TensorFlow V2 checkpoints (TensorBundle: ``<prefix>.index`` + ``<prefix>.data-*``) in numpy.

TF-Hub modules and TF-Slim releases ship their weights in this format; reading it here means
converting weights never needs TensorFlow. The writer lets tests and archives be built without
TensorFlow too, and lays out files as TF's own BundleWriter does.

The ``.index`` file is a LevelDB-style SSTable mapping sorted tensor names to
``BundleEntryProto`` records (dtype, shape, shard, offset, size, masked crc32c); its first key,
``""``, holds a ``BundleHeaderProto``. Tensor bytes are raw little-endian C-order arrays.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from imvec.errors import CheckpointError

__all__ = ["CheckpointReader", "read_checkpoint", "write_checkpoint"]

_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_BLOCK_SIZE = 4096  # LevelDB's default (TF uses 256 KiB); readers accept any size
_RESTART_INTERVAL = 16
_DT_STRING, _DT_BFLOAT16 = 7, 14
# TensorFlow DataType enum -> numpy dtype of the stored (little-endian) bytes.
_NUMPY_OF = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 8: "<c8", 9: "<i8",
             10: "?", 17: "<u2", 18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8"}
_CODE_OF = {np.dtype(v).newbyteorder("="): k for k, v in _NUMPY_OF.items()}


def _build_messages() -> dict[str, type]:
    """Declare TF's few bundle protos at runtime, so there is no generated _pb2 file or protoc.

    Enums are declared int32 (same wire format) so unknown dtypes still parse; ``slices`` is
    declared bytes (same wire format as a message) because only its presence matters here.
    """
    t = descriptor_pb2.FieldDescriptorProto
    spec = {
        "Dim": [(1, "size", t.TYPE_INT64), (2, "name", t.TYPE_STRING)],
        "TensorShapeProto": [(2, "dim", "Dim"), (3, "unknown_rank", t.TYPE_BOOL)],
        "VersionDef": [(1, "producer", t.TYPE_INT32), (2, "min_consumer", t.TYPE_INT32)],
        "BundleHeaderProto": [(1, "num_shards", t.TYPE_INT32), (2, "endianness", t.TYPE_INT32),
                              (3, "version", "VersionDef")],
        "BundleEntryProto": [(1, "dtype", t.TYPE_INT32), (2, "shape", "TensorShapeProto"),
                             (3, "shard_id", t.TYPE_INT32), (4, "offset", t.TYPE_INT64),
                             (5, "size", t.TYPE_INT64), (6, "crc32c", t.TYPE_FIXED32),
                             (7, "slices", t.TYPE_BYTES)],
    }
    f = descriptor_pb2.FileDescriptorProto(name="imvec_tb.proto", package="imvec_tb",
                                           syntax="proto3")
    for name, fields in spec.items():
        msg = f.message_type.add(name=name)
        for number, field, kind in fields:
            label = t.LABEL_REPEATED if field in ("dim", "slices") else t.LABEL_OPTIONAL
            fd = msg.field.add(name=field, number=number, label=label)
            if isinstance(kind, str):
                fd.type, fd.type_name = t.TYPE_MESSAGE, f".imvec_tb.{kind}"
            else:
                fd.type = kind
    pool = descriptor_pool.DescriptorPool()  # private, so TF's own protos never clash
    pool.Add(f)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"imvec_tb.{n}"))
            for n in spec}


_PB = _build_messages()


def _mask(crc: int) -> int:
    """TF and LevelDB store crcs masked, so a crc of data that embeds crcs stays strong."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _masked_crc(data) -> int:
    return _mask(google_crc32c.value(data))


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte, pos = buf[pos], pos + 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _decode_handle(buf, pos: int = 0) -> tuple[int, int, int]:
    """A BlockHandle: (offset, size, position after it)."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _index_handle(buf: bytes, path: Path) -> tuple[int, int]:
    if len(buf) < _FOOTER_SIZE:
        raise CheckpointError(f"{path} is truncated ({len(buf)} bytes, less than the "
                              f"{_FOOTER_SIZE}-byte footer); copy the checkpoint again")
    footer = buf[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[40:])[0] != _MAGIC:
        raise CheckpointError(f"{path} is not a TensorFlow V2 checkpoint index, or is truncated "
                              "(no magic number at its end); pass the checkpoint prefix, e.g. "
                              ".../model.ckpt, or copy the checkpoint again")
    offset, size, _ = _decode_handle(footer, _decode_handle(footer)[2])  # skip the metaindex
    return offset, size


def _read_block(buf: bytes, offset: int, size: int, path: Path) -> list[tuple[bytes, bytes]]:
    """Check a block's trailer, then decode its prefix-compressed (key, value) entries."""
    if offset + size + 5 > len(buf) - _FOOTER_SIZE:
        raise CheckpointError(f"{path} is truncated or corrupt: a block at bytes "
                              f"{offset}..{offset + size + 5} runs past the end of its data")
    stored = struct.unpack_from("<I", buf, offset + size + 1)[0]
    computed = _masked_crc(buf[offset:offset + size + 1])
    if stored != computed:
        raise CheckpointError(f"block crc32c mismatch in {path} at byte {offset}: stored "
                              f"0x{stored:08x}, computed 0x{computed:08x}; the file is corrupt")
    if buf[offset + size] != 0:
        kind = "snappy" if buf[offset + size] == 1 else f"type {buf[offset + size]}"
        raise CheckpointError(f"{path} has {kind}-compressed blocks, which imvec does not "
                              "read; re-save the checkpoint with TensorFlow (uncompressed)")
    block = buf[offset:offset + size]
    limit = size - 4 - 4 * struct.unpack_from("<I", block, size - 4)[0]  # before restarts
    pos, key, items = 0, b"", []
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key, pos = key[:shared] + block[pos:pos + unshared], pos + unshared
        items.append((key, block[pos:pos + value_len]))
        pos += value_len
    if pos != limit:
        raise CheckpointError(f"{path} is corrupt: a block's entries overrun its restart array")
    return items


class _BlockBuilder:
    """A LevelDB block: keys share prefixes with the previous key, except at restart points."""

    def __init__(self, restart_interval: int):
        self.interval, self.count, self.last = restart_interval, 0, b""
        self.out, self.restarts = bytearray(), [0]

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count and self.count % self.interval == 0:
            self.restarts.append(len(self.out))
        elif self.count:
            shared = len(os.path.commonprefix([self.last, key]))
        self.out += _put_varint(shared) + _put_varint(len(key) - shared)
        self.out += _put_varint(len(value)) + key[shared:] + value
        self.count, self.last = self.count + 1, key

    def size(self) -> int:
        return len(self.out) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        n = len(self.restarts)
        return bytes(self.out) + struct.pack(f"<{n + 1}I", *self.restarts, n)


def _separator(key: bytes, following: bytes | None) -> bytes:
    """LevelDB's short index key: >= every key of a block and < the next block's first key."""
    if following is None:  # last block: the shortest key after it
        i = next((i for i, b in enumerate(key) if b != 0xFF), len(key))
        return key[:i] + bytes([key[i] + 1]) if i < len(key) else key
    i = len(os.path.commonprefix([key, following]))
    if i < min(len(key), len(following)) and key[i] + 1 < following[i]:
        return key[:i] + bytes([key[i] + 1])
    return key


def _build_table(items: list[tuple[bytes, bytes]]) -> bytes:
    """An SSTable of sorted items: data blocks, an empty metaindex, the index block, footer."""
    out = bytearray()

    def append(contents: bytes) -> bytes:
        handle = _put_varint(len(out)) + _put_varint(len(contents))
        out.extend(contents + b"\0" + struct.pack("<I", _masked_crc(contents + b"\0")))
        return handle

    block, index = _BlockBuilder(_RESTART_INTERVAL), _BlockBuilder(1)
    for n, (key, value) in enumerate(items, 1):
        block.add(key, value)
        if n == len(items) or block.size() >= _BLOCK_SIZE:  # LevelDB's flush rule
            index.add(_separator(key, items[n][0] if n < len(items) else None),
                      append(block.finish()))
            block = _BlockBuilder(_RESTART_INTERVAL)
    handles = append(_BlockBuilder(1).finish()) + append(index.finish())
    return bytes(out) + handles.ljust(40, b"\0") + struct.pack("<Q", _MAGIC)


def _read_index(path: Path) -> tuple:
    """The header and the name -> BundleEntryProto map; every block is crc-checked."""
    buf = path.read_bytes()
    try:
        items = [kv for _, handle in _read_block(buf, *_index_handle(buf, path), path)
                 for kv in _read_block(buf, *_decode_handle(handle)[:2], path)]
        if not items or items[0][0] != b"":
            raise CheckpointError(f"{path} has no header entry; it is corrupt")
        header = _PB["BundleHeaderProto"].FromString(items[0][1])
        # Keys starting with NUL are TF's per-slice entries of partitioned tensors.
        return header, {k.decode(): _PB["BundleEntryProto"].FromString(v)
                        for k, v in items[1:] if not k.startswith(b"\0")}
    except CheckpointError:
        raise
    except Exception as e:  # IndexError, struct.error, protobuf DecodeError, ...
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); copy the "
                              "checkpoint again") from None


def _data_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def _copy_out(buf, offset: int, size: int, stored: np.dtype, shape, verify: bool):
    """Copy one tensor out of the map (crc-ing it in place), so no view outlives the call."""
    with memoryview(buf) as whole, whole[offset:offset + size] as raw:
        flat = np.frombuffer(raw, np.uint8)
        crc = _masked_crc(flat) if verify else None
        array = flat.view(stored).reshape(shape).astype(stored.newbyteorder("="))
        del flat
    return array, crc


def _decode_strings(raw: bytes, shape: tuple[int, ...], where: str):
    """TF's string layout: varint64 lengths, masked crc of the lengths, then the bytes.

    Returns the value (bytes, or an object array of bytes) and the masked crc32c TF stores for
    it: over the lengths as uint32 (uint64 when larger), the length checksum, and the bytes.
    """
    lengths, values, pos, crc = [], [], 0, 0
    try:
        for _ in range(math.prod(shape)):
            n, pos = _varint(raw, pos)
            lengths.append(n)
            crc = google_crc32c.extend(crc, struct.pack("<I" if n < 2**32 else "<Q", n))
    except IndexError:
        pos = len(raw)
    crc, pos = google_crc32c.extend(crc, raw[pos:pos + 4]), pos + 4
    for n in lengths:
        values.append(raw[pos:pos + n])
        crc, pos = google_crc32c.extend(crc, values[-1]), pos + n
    if pos != len(raw):
        raise CheckpointError(f"{where} is corrupt: its string lengths do not add up to its "
                              f"{len(raw)} bytes; download it again")
    return (np.array(values, dtype=object).reshape(shape) if shape else values[0]), _mask(crc)


class CheckpointReader:
    """Random access to the tensors of one V2 checkpoint; the index is parsed once.

    Data shards are memory-mapped on first use, so reading a few tensors of a large checkpoint
    touches only their pages. bfloat16 tensors come back as float32 (exact: a bfloat16 is the
    high half of a float32) because numpy has no bfloat16. String tensors come back as
    ``bytes`` (scalars) or object arrays of ``bytes``.
    """

    def __init__(self, prefix: str | os.PathLike):
        prefix = Path(prefix)
        if prefix.name.endswith(".index"):
            prefix = prefix.with_name(prefix.name[: -len(".index")])
        self._prefix, self._index = prefix, Path(f"{prefix}.index")
        self._maps: dict[int, mmap.mmap | bytes] = {}
        if not self._index.is_file():
            raise CheckpointError(f"checkpoint index {self._index} does not exist; pass the "
                                  "checkpoint prefix (the path without .index), e.g. "
                                  ".../variables/variables or .../model.ckpt")
        header, self._entries = _read_index(self._index)
        if header.endianness != 0:
            raise CheckpointError(f"{self._index} was written on a big-endian machine; imvec "
                                  "reads little-endian checkpoints only")
        self._num_shards = max(header.num_shards, 1)
        self._sizes = self._shard_sizes()
        for name, entry in self._entries.items():
            self._check_entry(name, entry)

    def _shard_sizes(self) -> list[int]:
        """The data files' sizes; the index may only declare shards that exist (a forged
        count of millions must not become millions of paths)."""
        stem = f"{self._prefix.name}.data-"
        try:
            present = {e.name: e for e in os.scandir(self._prefix.parent or ".")
                       if e.name.startswith(stem)}
        except OSError:
            present = {}
        count = self._num_shards
        if count > len(present):
            first = next(_data_path(self._prefix, i, count).name for i in range(len(present) + 1)
                         if _data_path(self._prefix, i, count).name not in present)
            raise CheckpointError(f"missing data shard {first}: {self._index} declares {count} "
                                  f"data shards and {len(present)} exist beside it; copy every "
                                  f"{self._prefix.name}.data-* file along with the index")
        try:
            return [present[_data_path(self._prefix, i, count).name].stat().st_size
                    for i in range(count)]
        except KeyError as e:
            raise CheckpointError(f"missing data shard {e.args[0]} next to {self._index}; copy "
                                  f"every {self._prefix.name}.data-* file along with the "
                                  "index") from None

    def _check_entry(self, name: str, entry) -> None:
        """Shape, shard, offset and size of one tensor, bounded by the data file's real size,
        so that reading never hands numpy a negative, overflowing or impossible request."""
        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{self._index} is corrupt: tensor {name!r} declares {what}; "
                                   "get the checkpoint again from a trusted source")

        dims = [d.size for d in entry.shape.dim]
        if entry.shape.unknown_rank or any(d < 0 for d in dims):
            raise bad(f"shape {tuple(dims)} (negative or unknown dimensions)")
        if not 0 <= entry.shard_id < self._num_shards:
            raise bad(f"data shard {entry.shard_id} of {self._num_shards}")
        if entry.offset < 0 or entry.size < 0:
            raise bad(f"offset {entry.offset} and size {entry.size}")
        shard_size = self._sizes[entry.shard_id]
        if entry.offset + entry.size > shard_size:
            data_name = _data_path(self._prefix, entry.shard_id, self._num_shards).name
            raise CheckpointError(f"{data_name} is truncated: tensor {name!r} needs bytes "
                                  f"{entry.offset}..{entry.offset + entry.size} but the file "
                                  f"has {shard_size}")
        count = math.prod(dims)  # Python ints: no overflow
        if entry.slices:
            return  # refused when read
        if entry.dtype == _DT_STRING:
            if count > entry.size:  # every string needs at least its one-byte length
                raise bad(f"shape {tuple(dims)}: {count} strings in {entry.size} bytes")
        elif entry.dtype in _NUMPY_OF or entry.dtype == _DT_BFLOAT16:
            itemsize = 2 if entry.dtype == _DT_BFLOAT16 else np.dtype(_NUMPY_OF[entry.dtype]
                                                                      ).itemsize
            if count * itemsize != entry.size:
                raise bad(f"shape {tuple(dims)}, which needs {count * itemsize} bytes, in "
                          f"{entry.size} bytes")

    @property
    def files(self) -> list[Path]:
        """The index file, then the data shards: what makes up this checkpoint."""
        return [self._index] + [_data_path(self._prefix, i, self._num_shards)
                                for i in range(self._num_shards)]

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _entry(self, name: str):
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in {self._index}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(d.size for d in self._entry(name).shape.dim)

    def dtype(self, name: str) -> np.dtype:
        code = self._entry(name).dtype
        if code in (_DT_STRING, _DT_BFLOAT16):
            return np.dtype(object if code == _DT_STRING else np.float32)
        if code not in _NUMPY_OF:
            raise CheckpointError(f"tensor {name!r} in {self._index} has TensorFlow DataType "
                                  f"{code}, which has no numpy equivalent in imvec")
        return np.dtype(_NUMPY_OF[code]).newbyteorder("=")

    def _shard(self, shard_id: int, name: str):
        if shard_id not in self._maps:
            path = _data_path(self._prefix, shard_id, self._num_shards)
            if not path.is_file():
                raise CheckpointError(f"missing data shard {path.name} (it holds tensor "
                                      f"{name!r}) next to {self._index}; copy every "
                                      f"{self._prefix.name}.data-* file along with the index")
            with open(path, "rb") as f:
                empty = os.fstat(f.fileno()).st_size == 0  # mmap refuses empty files
                self._maps[shard_id] = b"" if empty else mmap.mmap(
                    f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard_id]

    def read(self, name: str, verify: bool = True) -> np.ndarray | bytes:
        self.dtype(name)  # refuses dtypes without a numpy equivalent
        entry, shape = self._entry(name), self.shape(name)
        if entry.slices:
            raise CheckpointError(f"tensor {name!r} in {self._index} is partitioned (saved as "
                                  "slices), which imvec does not support; re-save it whole")
        data_name = _data_path(self._prefix, entry.shard_id, self._num_shards).name
        buf, start, end = self._shard(entry.shard_id, name), entry.offset, entry.offset + entry.size
        if end > len(buf):
            raise CheckpointError(f"{data_name} is truncated: tensor {name!r} needs bytes "
                                  f"{start}..{end} but the file has {len(buf)}")
        if entry.dtype == _DT_STRING:
            where = f"string tensor {name!r} in {data_name}"
            value, crc = _decode_strings(buf[start:end], shape, where)
        else:
            stored = np.dtype("<u2" if entry.dtype == _DT_BFLOAT16 else _NUMPY_OF[entry.dtype])
            if entry.size != stored.itemsize * math.prod(shape):
                raise CheckpointError(f"tensor {name!r} in {self._index} has {entry.size} "
                                      f"bytes, but shape {shape} of {stored} needs another size")
            value, crc = _copy_out(buf, start, entry.size, stored, shape, verify)
        if verify and crc != entry.crc32c:
            raise CheckpointError(f"crc32c mismatch for tensor {name!r} in {data_name}: stored "
                                  f"0x{entry.crc32c:08x}, computed 0x{crc:08x}; the file is "
                                  "corrupt, download it again")
        if entry.dtype == _DT_BFLOAT16:
            return (value.astype(np.uint32) << 16).view(np.float32)
        return value

    def read_all(self, verify: bool = True) -> dict[str, np.ndarray]:
        return {name: self.read(name, verify) for name in self.keys()}

    def close(self) -> None:
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                m.close()
        self._maps.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, crc-checked, for callers that want all of it at once."""
    with CheckpointReader(prefix) as reader:
        return reader.read_all()


def _encode_tensor(value) -> tuple[int, tuple[int, ...], bytes, int]:
    """(DataType enum, shape, payload, masked crc32c), laid out as TF's BundleWriter does."""
    if isinstance(value, bytes) or (isinstance(value, np.ndarray) and value.dtype.kind in "OS"):
        array = np.asarray(value, dtype=object)
        items = [bytes(v) for v in array.reshape(-1)]
        lengths = b"".join(struct.pack("<I" if len(v) < 2**32 else "<Q", len(v)) for v in items)
        check = struct.pack("<I", _masked_crc(lengths))
        crc = google_crc32c.extend(google_crc32c.value(lengths + check), b"".join(items))
        payload = b"".join(_put_varint(len(v)) for v in items) + check + b"".join(items)
        return _DT_STRING, array.shape, payload, _mask(crc)
    array = np.asarray(value)
    code = _CODE_OF.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"cannot write dtype {array.dtype} to a TF checkpoint; use one of "
                         f"{sorted(str(d) for d in _CODE_OF)} or bytes")
    payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return code, array.shape, payload, _masked_crc(payload)


def write_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     num_shards: int = 1) -> None:
    """Write a V2 checkpoint TensorFlow can restore; tensors go round-robin over the shards.

    An old index is removed first and the new one written last, so an interrupted write
    leaves no index pointing at half-written data.
    """
    prefix = Path(prefix)
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    bad = [k for k in tensors if not isinstance(k, str) or not k or k.startswith("\0")]
    if bad:
        raise ValueError(f"tensor names must be non-empty strings not starting with NUL: {bad}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").unlink(missing_ok=True)
    entries = []
    with ExitStack() as stack:
        files = [stack.enter_context(open(_data_path(prefix, i, num_shards), "wb"))
                 for i in range(num_shards)]
        for i, name in enumerate(sorted(tensors)):
            code, shape, payload, crc = _encode_tensor(tensors[name])
            shard = files[i % num_shards]
            dims = [_PB["Dim"](size=d) for d in shape]
            entry = _PB["BundleEntryProto"](
                dtype=code, shape=_PB["TensorShapeProto"](dim=dims), shard_id=i % num_shards,
                offset=shard.tell(), size=len(payload), crc32c=crc)
            shard.write(payload)
            entries.append((name.encode(), entry.SerializeToString()))
    header = _PB["BundleHeaderProto"](num_shards=num_shards,
                                      version=_PB["VersionDef"](producer=1))
    Path(f"{prefix}.index").write_bytes(_build_table([(b"", header.SerializeToString()),
                                                      *entries]))

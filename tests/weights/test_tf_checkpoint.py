"""TensorBundle reader/writer, checked against checkpoints that TensorFlow 2.21 wrote."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from imvec.errors import CheckpointError
from imvec.weights import tf_checkpoint as tfc
from imvec.weights.tf_checkpoint import CheckpointReader, read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ROOTS = [REPO / "tests" / "fixtures", REPO.parent / "shared" / "fixtures"]


def find_fixture(name: str) -> Path:
    """tests/fixtures/<name> once the fixtures are copied in, ../shared/fixtures/<name> before."""
    for root in FIXTURE_ROOTS:
        if (root / name).is_dir():
            return root / name
    pytest.fail(f"fixture folder {name!r} not found under {FIXTURE_ROOTS}")


CHECKPOINTS = sorted({p.parent.name for root in FIXTURE_ROOTS if root.is_dir()
                      for p in root.glob("*/model.ckpt.index")})


@pytest.fixture
def fixture_dir():
    return find_fixture


@pytest.fixture
def nasnet_copy(tmp_path: Path) -> Path:
    """A writable copy of a real checkpoint, for corrupting (the shared files stay intact)."""
    for f in find_fixture("nasnet_mobile_small").glob("model.ckpt.*"):
        shutil.copy(f, tmp_path / f.name)
        (tmp_path / f.name).chmod(0o644)
    return tmp_path / "model.ckpt"


def documented_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The fixture README's generator, so the values are checked independently of our writer."""
    rng = np.random.RandomState((zlib.crc32(name.encode()) + 777001) % 2**32)
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("gamma", "moving_variance"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[:2 if "depthwise" in leaf else 3]))
    return rng.normal(0.0, 1 / np.sqrt(fan_in), shape).astype(np.float32)


def test_fixture_checkpoints_are_found():
    assert len(CHECKPOINTS) >= 5, f"expected the TF fixture checkpoints under {FIXTURE_ROOTS}"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fixture_matches_variables_tsv(name, fixture_dir):
    folder = fixture_dir(name)
    rows = [line.split("\t") for line in (folder / "variables.tsv").read_text().splitlines()[1:]]
    expected = {n: (tuple(json.loads(shape)), dtype) for n, shape, dtype in rows}
    with CheckpointReader(folder / "model.ckpt") as reader:
        assert {k: (reader.shape(k), str(reader.dtype(k))) for k in reader} == expected
        tensors = reader.read_all(verify=True)
    assert {k: (v.shape, str(v.dtype)) for k, v in tensors.items()} == expected
    for k, v in tensors.items():
        assert v.flags.owndata and v.flags.c_contiguous and v.flags.writeable, k
        assert np.isfinite(v).all(), k


def test_fixture_values_follow_the_documented_generator(fixture_dir):
    tensors = read_checkpoint(fixture_dir("nasnet_mobile_small") / "model.ckpt")
    stats = [k for k in tensors if k.endswith(("/gamma", "/moving_variance"))]
    assert stats and "conv0_bn/gamma" in stats and "conv0_bn/moving_variance" in stats
    for k in stats:
        assert tensors[k].min() >= 0.5 and tensors[k].max() <= 1.5, k
    for k in ["conv0_bn/gamma", "cell_0/1x1/weights", "final_layer/FC/weights",
              "cell_0/comb_iter_0/left/separable_5x5_1/depthwise_weights"]:
        np.testing.assert_array_equal(tensors[k], documented_value(k, tensors[k].shape), k)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_rewriting_a_fixture_reproduces_tensorflows_bytes(name, fixture_dir, tmp_path,
                                                          monkeypatch):
    """With TF's 256 KiB blocks (table_options.h), our writer emits TF's exact files."""
    monkeypatch.setattr(tfc, "_BLOCK_SIZE", 262144)
    source = fixture_dir(name) / "model.ckpt"
    write_checkpoint(tmp_path / "model.ckpt", read_checkpoint(source))
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"model.ckpt{suffix}").read_bytes() == \
            Path(f"{source}{suffix}").read_bytes(), suffix


DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32,
          np.int64, np.uint32, np.uint64, np.complex64, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_each_dtype(dtype, tmp_path):
    rng = np.random.RandomState(0)
    tensors = {
        "scalar": np.asarray(rng.uniform(-100, 100)).astype(dtype),
        "empty": np.zeros((0, 3), dtype),
        "block/kernel": (rng.uniform(-100, 100, (2, 3, 4)) + 0.5).astype(dtype),
        "fortran": np.asfortranarray(rng.uniform(0, 100, (3, 5))).astype(dtype),
    }
    write_checkpoint(tmp_path / "ckpt", tensors)
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.keys() == sorted(tensors)
        for k, v in tensors.items():
            assert reader.dtype(k) == np.dtype(dtype) and reader.shape(k) == v.shape
            out = reader.read(k)
            assert out.dtype == np.dtype(dtype) and out.shape == v.shape
            np.testing.assert_array_equal(out, v, k)


def test_bfloat16_reads_as_exact_float32(tmp_path, monkeypatch):
    values = np.array([[1.0, -2.5], [3.140625, np.inf], [0.0, -1e30]], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    monkeypatch.setitem(tfc._CODE_OF, np.dtype(np.uint16), 14)  # write uint16 as DT_BFLOAT16
    write_checkpoint(tmp_path / "ckpt", {"w": bits})
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.dtype("w") == np.float32
        np.testing.assert_array_equal(reader.read("w"), (bits.astype(np.uint32) << 16)
                                      .view(np.float32))
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "ckpt")["w"][0], [1.0, -2.5])


def test_round_trip_strings_and_their_checksum(tmp_path):
    graph = b"\x0a\x05graph\x00\xff" * 50
    table = np.array([[b"a", b""], [b"\x80" * 200, b"last"]], dtype=object)
    write_checkpoint(tmp_path / "ckpt", {"_CHECKPOINTABLE_OBJECT_GRAPH": graph, "t": table})
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.read("_CHECKPOINTABLE_OBJECT_GRAPH") == graph
        assert reader.read("t").shape == (2, 2) and reader.read("t").tolist() == table.tolist()
    data = tmp_path / "ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) - 1] ^= 1  # last byte of the last string of "t"
    data.write_bytes(bytes(raw))
    with CheckpointReader(tmp_path / "ckpt") as reader, \
            pytest.raises(CheckpointError, match=r"crc32c mismatch for tensor 't'"):
        reader.read("t")


def test_many_keys_span_several_index_blocks(tmp_path):
    tensors = {f"cell_{i // 10}/layer_{7 * i:05d}/weights": np.full((i % 7,), i, np.int32)
               for i in range(1500)}
    write_checkpoint(tmp_path / "ckpt", tensors)
    buf = (tmp_path / "ckpt.index").read_bytes()
    blocks = tfc._read_block(buf, *tfc._index_handle(buf, "ckpt.index"), "ckpt.index")
    assert len(blocks) > 10  # 4 KiB data blocks
    offset, size, _ = tfc._decode_handle(blocks[0][1])
    assert struct.unpack_from("<I", buf, offset + size - 4)[0] > 1  # several restart points
    data = [tfc._read_block(buf, *tfc._decode_handle(h)[:2], "i") for _, h in blocks]
    for (separator, _), block, following in zip(blocks, data, data[1:] + [None], strict=True):
        assert block[-1][0] <= separator and (following is None or separator < following[0][0])
    shortened = sum(len(s) < len(b[-1][0]) for (s, _), b in zip(blocks, data, strict=True))
    assert shortened > 5  # LevelDB-style short separators
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.keys() == sorted(tensors) and len(reader) == 1500
        assert list(reader) == sorted(tensors) and "cell_3/layer_00217/weights" in reader
        for k, v in reader.read_all().items():
            np.testing.assert_array_equal(v, tensors[k], k)


def test_two_shards(tmp_path):
    tensors = {f"v{i}": np.arange(i + 1, dtype=np.float64) * i for i in range(9)}
    write_checkpoint(tmp_path / "ckpt", tensors, num_shards=2)
    shards = sorted(p.name for p in tmp_path.glob("ckpt.data-*"))
    assert shards == ["ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002"]
    assert all((tmp_path / s).stat().st_size > 0 for s in shards)
    result = read_checkpoint(tmp_path / "ckpt")
    assert result.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(result[k], v, k)
    (tmp_path / shards[1]).unlink()
    # refused when opened: every declared shard must exist (and bounds what the index claims)
    with pytest.raises(CheckpointError, match="missing data shard ckpt.data-00001-of-00002"):
        CheckpointReader(tmp_path / "ckpt")


def test_reader_accepts_the_index_path_and_returns_owned_arrays(fixture_dir):
    index = fixture_dir("mobilenet_v1_025_128") / "model.ckpt.index"
    reader = CheckpointReader(str(index))
    with reader:
        first = reader.read("MobilenetV1/Conv2d_0/weights")
        first[...] = 0  # an owned copy: the map and the next read are untouched
        assert reader.read("MobilenetV1/Conv2d_0/weights").any()
        with pytest.raises(KeyError, match="no/such/tensor"):
            reader.read("no/such/tensor")
    assert reader._maps == {}  # closed


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_data_byte_fails_crc_unless_verify_is_off(nasnet_copy):
    name = "cell_0/1x1/weights"
    with CheckpointReader(nasnet_copy) as reader:
        original, entry = reader.read(name), reader._entries[name]
    _flip(Path(f"{nasnet_copy}.data-00000-of-00001"), entry.offset + 5)
    with CheckpointReader(nasnet_copy) as reader:
        with pytest.raises(CheckpointError, match=r"crc32c mismatch for tensor "
                           r"'cell_0/1x1/weights' in model\.ckpt\.data-00000-of-00001"):
            reader.read(name)
        changed = reader.read(name, verify=False)
        reader.read("cell_0/beginning_bn/beta")  # other tensors are fine
    assert (changed != original).sum() == 1


def test_truncated_data_file(nasnet_copy):
    data = Path(f"{nasnet_copy}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001 is truncated: tensor '.*' "
                       r"needs bytes \d+\.\.\d+ but the file has 867962"):
        read_checkpoint(nasnet_copy)


@pytest.mark.parametrize("keep", [0, 30, 10000, -1], ids=lambda k: f"keep{k}")
def test_truncated_index(nasnet_copy, keep):
    index = Path(f"{nasnet_copy}.index")
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="model.ckpt.index .*truncated"):
        CheckpointReader(nasnet_copy)


def test_corrupt_index_block(nasnet_copy):
    _flip(Path(f"{nasnet_copy}.index"), 100)
    with pytest.raises(CheckpointError, match="block crc32c mismatch in .*model.ckpt.index"):
        CheckpointReader(nasnet_copy)


def test_wrong_magic(tmp_path):
    (tmp_path / "ckpt.index").write_bytes(b"{'not': 'an index'}" * 10)
    with pytest.raises(CheckpointError, match=r"not a TensorFlow V2 checkpoint index.*prefix"):
        CheckpointReader(tmp_path / "ckpt.index")


def test_missing_files(nasnet_copy, tmp_path):
    missing = re.escape(f"{tmp_path / 'nope.index'} does not exist")
    with pytest.raises(CheckpointError, match=missing):
        CheckpointReader(tmp_path / "nope")
    Path(f"{nasnet_copy}.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="missing data shard model.ckpt.data-00000-of-00001"):
        read_checkpoint(nasnet_copy)


def _write_index(prefix: Path, entries: dict, **header) -> None:
    header = tfc._PB["BundleHeaderProto"](**{"num_shards": 1, **header}).SerializeToString()
    items = [(b"", header)] + [(k.encode(), tfc._PB["BundleEntryProto"](**e).SerializeToString())
                               for k, e in sorted(entries.items())]
    Path(f"{prefix}.index").write_bytes(tfc._build_table(items))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"\0" * 64)


def test_partitioned_and_unknown_dtypes_are_refused(tmp_path):
    _write_index(tmp_path / "ckpt", {"part": {"dtype": 1, "slices": [b"\x0a\x00"]},
                                     "\0part\0slice": {"dtype": 1}, "res": {"dtype": 20}})
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.keys() == ["part", "res"]
        with pytest.raises(CheckpointError, match="'part' .*partitioned"):
            reader.read("part")
        with pytest.raises(CheckpointError, match="'res' .*DataType 20"):
            reader.read("res")


def test_big_endian_header_is_refused(tmp_path):
    _write_index(tmp_path / "ckpt", {}, endianness=1)
    with pytest.raises(CheckpointError, match="big-endian"):
        CheckpointReader(tmp_path / "ckpt")


def test_snappy_blocks_are_refused(tmp_path):
    write_checkpoint(tmp_path / "ckpt", {"x": np.ones(3, np.float32)})
    index = tmp_path / "ckpt.index"
    buf = bytearray(index.read_bytes())
    blocks = tfc._read_block(bytes(buf), *tfc._index_handle(bytes(buf), "i"), "i")
    offset, size, _ = tfc._decode_handle(blocks[0][1])
    buf[offset + size] = 1  # compression type: snappy, with a matching block crc
    buf[offset + size + 1:offset + size + 5] = struct.pack(
        "<I", tfc._masked_crc(bytes(buf[offset:offset + size + 1])))
    index.write_bytes(bytes(buf))
    with pytest.raises(CheckpointError, match="snappy-compressed"):
        CheckpointReader(tmp_path / "ckpt")


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="cannot write dtype"):
        write_checkpoint(tmp_path / "a", {"t": np.array(["2020-01-01"], "datetime64[D]")})
    with pytest.raises(ValueError, match="non-empty"):
        write_checkpoint(tmp_path / "b", {"": np.zeros(1)})


# -- a stranger's checkpoint: everything it declares is bounded by the files' real sizes ----
def _forge(prefix: Path, entry: dict, data: bytes = b"\0" * 64, **header) -> Path:
    _write_index(prefix, {"t": {"dtype": 1, **entry}}, **header)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)
    return prefix


def _shape(*dims):
    return tfc._PB["TensorShapeProto"](dim=[tfc._PB["Dim"](size=d) for d in dims])


FORGED = {
    "negative dims": ({"shape": _shape(-1, -1), "size": 4}, "shape"),
    "overflowing dims": ({"shape": _shape(2**32, 2**32), "size": 0}, "shape"),
    "huge dims": ({"shape": _shape(2**62), "size": 64}, "shape"),
    "negative offset": ({"shape": _shape(1), "size": 4, "offset": -4}, "offset"),
    "offset past the end": ({"shape": _shape(1), "size": 4, "offset": 2**62}, "truncated"),
    "negative size": ({"shape": _shape(), "size": -4}, "size"),
    "shard out of range": ({"shape": _shape(1), "size": 4, "shard_id": 7}, "shard"),
    "string count over size": ({"dtype": 7, "shape": _shape(10**12), "size": 5}, "shape"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_entries_give_one_checkpoint_error(tmp_path, case):
    entry, what = FORGED[case]
    prefix = _forge(tmp_path / "ckpt", entry)
    with pytest.raises(CheckpointError, match=what) as info:
        _shape_then_read(prefix)
    assert info.value.__cause__ is None and info.value.__context__ is None  # one traceback
    assert "\n" not in str(info.value)


def _shape_then_read(prefix: Path) -> None:
    with CheckpointReader(prefix) as reader:
        reader.shape("t")  # what a completeness check reads before any data
        reader.read("t")


def test_twenty_million_shards_are_refused_at_once(tmp_path):
    prefix = _forge(tmp_path / "ckpt", {"shape": _shape(1), "size": 4}, num_shards=20_000_000)
    with pytest.raises(CheckpointError, match="declares 20000000 data shards.*1 exist"):
        CheckpointReader(prefix)

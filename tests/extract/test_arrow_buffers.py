"""Arrow arrays from buffers: same values as pyarrow's own constructors, through Parquet."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imvec.extract.arrow import fixed_size_lists, list_values, read_columns, strings


def test_strings_with_nulls_and_unicode():
    values = ["a", None, "héllo, wörld", "", "日本"]
    array = strings(values)
    assert array.type == pa.string() and array.null_count == 1
    assert array.to_pylist() == values
    assert strings([]).to_pylist() == []


def test_fixed_size_lists_round_trip_through_parquet_with_null_rows(tmp_path):
    values = np.arange(20, dtype=np.float32).reshape(5, 4)
    valid = np.array([True, False, True, True, False])
    array = fixed_size_lists(values, valid)
    assert array.type == pa.list_(pa.float32(), 4) and array.null_count == 2
    expected = [list(map(float, row)) if ok else None for row, ok in zip(values, valid,
                                                                          strict=True)]
    assert array.to_pylist() == expected
    pq.write_table(pa.table({"f": array, "s": strings(list("abcde"))}), tmp_path / "t.parquet",
                   row_group_size=2)
    table = read_columns(tmp_path / "t.parquet", ["f"])
    back = list_values(table.column("f"))
    np.testing.assert_array_equal(back[valid], values[valid])
    assert back.flags.writeable


def test_list_values_of_sliced_arrays():
    values = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    array = fixed_size_lists(values)
    np.testing.assert_array_equal(list_values(array.slice(2, 5)), values[2:7])
    chunked = pa.chunked_array([array.slice(0, 4), array.slice(4, 5)])
    np.testing.assert_array_equal(list_values(chunked), values)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"f": array}), buffer)
    assert buffer.getvalue()[:4] == b"PAR1"

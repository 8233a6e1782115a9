"""The one JSONL/Parquet reader (tte_flash.data.iter_rows): lazy, column selection, errors that name the file
and the line, and what `tte-flash encode --input` reads from a file."""
import io
import itertools
import json
import sys

import numpy as np
import pytest

from tte_flash.data import (PARQUET_BATCH_ROWS, iter_encode_inputs, iter_rows, json_values, load_rows,
                            parquet_input_columns)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def random_rows(rng, n):
    """Rows with texts of random length, a list column, ints, and None cells."""
    rows = []
    for i in range(n):
        text = " ".join(f"w{int(x)}" for x in rng.integers(0, 500, int(rng.integers(1, 30))))
        rows.append({"id": i, "text": text if rng.random() > 0.1 else None,
                     "instruction": None if rng.random() > 0.3 else f"task {int(rng.integers(0, 5))}",
                     "tags": [int(x) for x in rng.integers(0, 9, int(rng.integers(0, 4)))]})
    return rows


def test_parquet_streams_every_row_in_order_across_row_groups(tmp_path, rng):
    n = int(rng.integers(2 * PARQUET_BATCH_ROWS, 3 * PARQUET_BATCH_ROWS)) + 1  # an odd count, several batches
    rows = random_rows(rng, n)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=int(rng.integers(37, 101)))
    assert list(iter_rows(path)) == pq.read_table(path).to_pylist() == rows
    assert list(iter_rows(path, ["text", "nope", "id"])) == [{"id": r["id"], "text": r["text"]} for r in rows]
    assert list(iter_rows(path, ["nope"])) == [{}] * n
    assert load_rows(path, ("id",), columns=["id"]) == [{"id": i} for i in range(n)]


def test_rows_are_read_lazily(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)) + "{broken\n")
    rows = iter_rows(path)
    assert list(itertools.islice(rows, 5)) == [{"i": i} for i in range(5)]  # the bad line is not read yet
    with pytest.raises(ValueError, match="rows.jsonl:6: not JSON"):
        next(rows)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"i": list(range(3 * PARQUET_BATCH_ROWS))}), parquet, row_group_size=PARQUET_BATCH_ROWS)
    source = pq.ParquetFile(parquet)
    batches = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append(len(batch))
            yield batch
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    first = next(iter_rows(parquet))
    assert first == {"i": 0} and batches == [PARQUET_BATCH_ROWS] and source.metadata.num_row_groups == 3


def test_jsonl_lines_strings_bom_crlf_and_json_arrays(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\n"a text"\r\n\r\n{"text": "caf\xc3\xa9", "image": null}\r\n  \n')
    assert list(iter_rows(path, strings=True)) == ["a text", {"text": "café", "image": None}]
    with pytest.raises(ValueError, match=r"inputs.jsonl: line 2 is a JSON str, not an object \(a row\)"):
        list(iter_rows(path))
    array = tmp_path / "rows.json"
    array.write_text('\n [{"a": 1},\n {"a": 2}]\n')
    assert list(iter_rows(array)) == [{"a": 1}, {"a": 2}]
    assert list(iter_rows(array, ["b"])) == [{}, {}]
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(ValueError, match="bad.json:2: not JSON"):
        list(iter_rows(tmp_path / "bad.json"))
    (tmp_path / "list.jsonl").write_text('"x"\n[1]\n')
    with pytest.raises(ValueError, match=r"line 2 is a JSON list, not an object \(a row\) or a string"):
        list(iter_rows(tmp_path / "list.jsonl", strings=True))


def test_errors_name_the_file_and_the_line(tmp_path, monkeypatch):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"bytes.jsonl:3: not UTF-8 text \(byte 0xff at column 11\)"):
        list(iter_rows(path))
    # json_values reports and goes on (the Ray datasource keeps errors as rows)
    found = list(json_values(io.BytesIO(b'{"a": 1}\n{x\n2\n'), "mem.jsonl"))
    assert [(w, n, v) for w, n, v, _ in found] == [("line", 1, {"a": 1}), ("line", 2, None), ("line", 3, 2)]
    assert found[1][3].startswith("mem.jsonl:2: not JSON") and found[0][3] is None
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        iter_rows(tmp_path / "nope.parquet")  # at the call, not at the first row
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(ValueError, match="fake.parquet: not a readable Parquet file"):
        iter_rows(tmp_path / "fake.parquet")
    (tmp_path / "rows.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        iter_rows(tmp_path / "rows.csv")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'tte-flash\[parquet\]'"):
        iter_rows(tmp_path / "fake.parquet")


def test_encode_inputs_of_a_parquet_file_match_datasets(tmp_path, rng):
    """The pyarrow reader gives the rows the former `datasets` streaming reader gave (text, instruction,
    None cells dropped, other columns ignored), and Hugging Face Image columns as the image's bytes."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from tte_flash.encoding import iter_inputs
    rows = random_rows(rng, 40)
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    streamed = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    assert list(iter_encode_inputs(path)) == list(iter_inputs(streamed))
    assert parquet_input_columns(path) == ["text", "instruction"]

    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a", None, "c"], "label": [1, 2, 3]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.to_parquet(str(tmp_path / "images.parquet"))
    read = list(iter_encode_inputs(tmp_path / "images.parquet"))
    assert [sorted(r) for r in read] == [["image", "text"], ["image"], ["image", "text"]]
    for item, image in zip(read, images):
        assert isinstance(item["image"], bytes)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(item["image"]))), np.asarray(image))
    pq.write_table(pa.table({"id": [1], "caption_text": ["x"]}), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match=r"none.parquet has no text, image or video column \(columns: \['id', "):
        iter_encode_inputs(tmp_path / "none.parquet")


def test_cli_encodes_a_hugging_face_image_parquet(tmp_path, rng):
    """`tte-flash encode --input images.parquet`: an Image column written by `datasets` embeds as the images."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from tte_flash import TTEFlashModel
    from tte_flash.cli import main
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), 28, 3), dtype=np.uint8))
              for _ in range(3)]
    texts = ["a red thing", None, "a photo"]
    dataset = datasets.Dataset.from_dict({"image": images, "text": texts}).cast_column("image", datasets.Image())
    dataset.to_parquet(str(tmp_path / "images.parquet"))
    assert main(["encode", "--input", str(tmp_path / "images.parquet"), "--model", "tiny-instruct", "--role",
                 "document", "--output", str(tmp_path / "out.npy")]) == 0
    inputs = [{"image": image, **({"text": text} if text else {})} for image, text in zip(images, texts)]
    expected = TTEFlashModel.from_preset("tiny-instruct").encode_document(inputs)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)

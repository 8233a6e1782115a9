"""Data rows: JSONL/Parquet loading, clear errors, media resolution, train/eval examples."""
import json
import sys

import pytest
from PIL import Image

from tte_flash.data import (EVAL_COLUMNS, TRAIN_COLUMNS, eval_example, load_rows, make_input, resolve_media,
                            train_example)

ROWS = [{"qry": "<|image_1|>\nWhat is red?", "qry_image_path": "img/a.png", "pos_text": "a ball",
         "pos_image_path": "", "neg_text": ["a cup", "a hat"], "neg_image_path": "", "qry_cot": "red is the ball."},
        {"qry": "plain text query", "qry_image_path": "", "pos_text": "", "pos_image_path": "img/b.png",
         "qry_cot": ""}]


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (56, 56), "red").save(tmp_path / "img" / name)
    return tmp_path


def write_jsonl(path, rows, blank_lines=False):
    text = "".join(json.dumps(r) + "\n" + ("\n" if blank_lines else "") for r in rows)
    path.write_text(text)
    return path


def test_load_jsonl_and_json_array(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, blank_lines=True)
    assert load_rows(path, TRAIN_COLUMNS) == ROWS
    array = tmp_path / "train.json"
    array.write_text(json.dumps(ROWS, indent=1))
    assert load_rows(array, TRAIN_COLUMNS) == ROWS


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{"qry_text": "q1", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]},
            {"qry_text": "q2", "qry_img_path": "x.png", "tgt_text": ["c", "d"], "tgt_img_path": ["", ""]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval.parquet")
    assert load_rows(tmp_path / "eval.parquet", EVAL_COLUMNS) == rows


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "eval.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_rows(tmp_path / "eval.parquet")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="no rows in .*empty.jsonl"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:3: not JSON"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 is a JSON list"):
        load_rows(tmp_path / "list.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_rows(tmp_path / "rows.csv")


def test_missing_column_names_column_file_and_row(tmp_path):
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "pos_text"}, {}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"train.jsonl: required column 'pos_text' is missing \(first in row 2"):
        load_rows(path, TRAIN_COLUMNS)
    with pytest.raises(ValueError, match=r"columns 'pos_image_path', 'qry', 'qry_image_path' are missing \(first in row 3"):
        load_rows(path, ("pos_image_path", "qry", "qry_image_path"))
    assert len(load_rows(path)) == 3  # nothing required: any object is a row


def test_resolve_media(root):
    assert resolve_media(root, None) is None and resolve_media(root, "") is None
    assert resolve_media(root, "img/a.png") == str(root / "img" / "a.png")
    assert resolve_media(None, str(root / "img" / "a.png")) == str(root / "img" / "a.png")
    with pytest.raises(FileNotFoundError, match=str(root / "img" / "missing.png")):
        resolve_media(root, "img/missing.png")


def test_make_input_keeps_only_present_keys(root):
    assert make_input("hello") == {"text": "hello"}
    assert make_input("", "img/a.png", image_root=root) == {"image": str(root / "img" / "a.png")}
    assert make_input("t", None, "img", image_root=root, instruction="Find it.") == \
        {"instruction": "Find it.", "text": "t", "video": str(root / "img")}
    with pytest.raises(ValueError, match="empty input"):
        make_input("", "", image_root=root)


def test_train_example(root):
    first = train_example(ROWS[0], root)
    assert first["query"] == {"text": ROWS[0]["qry"], "image": str(root / "img" / "a.png")}  # text unchanged
    assert first["positive"] == {"text": "a ball"}
    assert first["negatives"] == [{"text": "a cup"}, {"text": "a hat"}]
    assert first["cot"] == "red is the ball."
    second = train_example(ROWS[1], root)
    assert second["positive"] == {"image": str(root / "img" / "b.png")}
    assert second["negatives"] == [] and second["cot"] is None  # blank trace: contrastive loss only
    row = {**ROWS[1], "neg_text": ["x", ""], "neg_image_path": ["", "img/c.png"]}
    row.pop("qry_cot")
    example = train_example(row, root)
    assert example["negatives"] == [{"text": "x"}, {"image": str(root / "img" / "c.png")}] and example["cot"] is None


def test_train_example_missing_image_names_path(root):
    with pytest.raises(FileNotFoundError, match=str(root / "img" / "gone.png")):
        train_example({**ROWS[0], "qry_image_path": "img/gone.png"}, root)


def test_eval_example(root):
    row = {"qry_text": "<|image_1|> which?", "qry_img_path": "img/a.png", "tgt_text": ["pos", "neg1", ""],
           "tgt_img_path": ["", "", "img/b.png"]}
    query, candidates = eval_example(row, root)
    assert query == {"text": "<|image_1|> which?", "image": str(root / "img" / "a.png")}
    assert candidates == [{"text": "pos"}, {"text": "neg1"}, {"image": str(root / "img" / "b.png")}]
    broadcast = eval_example({**row, "tgt_text": ["pos", "neg1"], "tgt_img_path": ""}, root)[1]
    assert broadcast == [{"text": "pos"}, {"text": "neg1"}]
    with pytest.raises(ValueError, match="empty input"):  # a candidate with neither text nor image
        eval_example({**row, "tgt_img_path": ""}, root)
    with pytest.raises(ValueError, match="different lengths"):
        eval_example({**row, "tgt_img_path": ["", ""]}, root)
    with pytest.raises(ValueError, match="no candidates"):
        eval_example({**row, "tgt_text": [], "tgt_img_path": []}, root)

"""Training rows are checked before the first step (issue 18, item 2): a bad row anywhere in the data fails the
run at the start, named by file, line and column, before the model is even built; every image is opened;
``--resume_from_checkpoint true`` resumes from the newest checkpoint in --output_dir."""
import json

import numpy as np
import pytest
from PIL import Image

import tte_flash.training as training
from tte_flash.data_check import TrainingDataError, image_problem, validate_rows
from tte_flash.training import main as train_main

from test_training import args, losses, make_data


def _rows(data):
    return [json.loads(line) for line in data.read_text().splitlines()]


def _write(data, rows, blank_lines=False):
    data.write_text(("\n\n" if blank_lines else "\n").join(json.dumps(r) for r in rows) + "\n")


def _truncate(path, keep=0.5):
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep)])


@pytest.fixture
def no_model(monkeypatch):
    """The row check runs before the model is built: building it fails the test."""
    def refuse(*_):
        raise AssertionError("the model was built before the training rows were checked")
    monkeypatch.setattr(training, "build_model", refuse)


def _break_row(root, rows, breakage):
    """Break row 7 (line 7) of a 12-row data set; returns the column the error must name."""
    row = rows[6]
    if breakage == "qry_int":
        row["qry"] = 123
        return "qry", "must be text .* got int 123"
    if breakage == "pos_empty":
        row["pos_text"], row["pos_image_path"] = "", None
        return "pos_text", "the positive target is empty"
    if breakage == "query_blank":
        row["qry"], row["qry_image_path"] = "   ", ""
        return "qry", "the query is empty"
    if breakage == "ragged_negatives":
        row["neg_text"], row["neg_image_path"] = ["red", "blue"], ["images/1.png", "images/2.png", "images/3.png"]
        return "neg_text", r"lists of different lengths .*'neg_text': 2, 'neg_image_path': 3"
    if breakage == "neg_element_type":
        row["neg_text"] = ["red", 7]
        return "neg_text", r"got int 7 \(element 1\)"
    if breakage == "qry_cot_int":
        row["qry_cot"] = 5
        return "qry_cot", "must be text .* got int 5"
    if breakage == "image_path_type":
        row["qry_image_path"] = ["images/1.png"]
        return "qry_image_path", "must be a path .* got list"
    if breakage == "missing_image":
        row["qry_image_path"] = "images/gone.png"
        return "qry_image_path", "images/gone.png"
    if breakage == "truncated_png":
        _truncate(root / "images" / "6.png", 0.6)
        return "qry_image_path", r"images/6.png cannot be read as an image"
    if breakage == "truncated_jpeg":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(root / "images" / "x.jpg")
        _truncate(root / "images" / "x.jpg")
        row["pos_image_path"] = "images/x.jpg"
        return "pos_image_path", "x.jpg is truncated"
    if breakage == "zero_pixel_image":  # a PNG header claiming 0x0 pixels
        header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 8 + b"\x08\x02\x00\x00\x00"
        (root / "images" / "z.png").write_bytes(header)
        row["qry_image_path"] = "images/z.png"
        return "qry_image_path", "z.png"
    if breakage == "empty_frames_folder":
        (root / "frames").mkdir()
        row["qry_video_path"] = "frames"
        return "qry_video_path", "folder without frames"
    raise ValueError(breakage)


BREAKAGES = ["qry_int", "pos_empty", "query_blank", "ragged_negatives", "neg_element_type", "qry_cot_int",
             "image_path_type", "missing_image", "truncated_png", "truncated_jpeg", "zero_pixel_image",
             "empty_frames_folder"]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_bad_row_is_named_by_file_line_and_column_before_the_model_is_built(tmp_path, no_model, breakage):
    data = make_data(tmp_path / "data", n=12)
    rows = _rows(data)
    column, problem = _break_row(tmp_path / "data", rows, breakage)
    _write(data, rows)
    with pytest.raises(TrainingDataError) as caught:
        train_main(args(data, tmp_path / "run", "--max_steps", "1"))
    message = str(caught.value)
    assert f"{data} line 7, column '{column}'" in message, message
    assert __import__("re").search(problem, message), message
    assert "1 problem in 1 of 12 training rows" in message
    assert not (tmp_path / "run").exists()  # nothing was trained or saved


def test_all_problems_are_listed_with_lines_counting_blank_ones(tmp_path, no_model):
    data = make_data(tmp_path / "data", n=30)
    rows = _rows(data)
    for i in range(2, 30, 2):  # 14 bad rows
        rows[i]["qry"] = i
    _write(data, rows, blank_lines=True)  # row i is on line 2i + 1
    with pytest.raises(TrainingDataError) as caught:
        train_main(args(data, tmp_path / "run", "--max_steps", "1"))
    message = str(caught.value)
    assert "14 problems in 14 of 30 training rows" in message and "... and 4 more" in message
    assert f"{data} line 5, column 'qry'" in message and f"{data} line 41, column 'qry'" in message


def test_rows_of_a_second_file_and_of_parquet_are_named_by_their_own_file(tmp_path, no_model):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    first = make_data(tmp_path / "data", n=8)
    more = [{**row, "qry_cot": row["qry_cot"] or None} for row in _rows(first)[:5]]
    more[4]["pos_text"] = ""
    second = tmp_path / "data" / "more.parquet"
    pq.write_table(pa.Table.from_pylist(more), second)
    run = args(first, tmp_path / "run", "--max_steps", "1")
    at = run.index("--train_data") + 1
    with pytest.raises(TrainingDataError) as caught:
        train_main(run[:at] + [str(first), str(second)] + run[at + 1:])
    message = str(caught.value)
    assert "1 problem in 1 of 13 training rows" in message
    assert f"{second} row 5, column 'pos_text': the positive target is empty" in message, message


def test_a_trace_in_every_row_when_an_option_needs_one(tmp_path, no_model):
    data = make_data(tmp_path / "data", n=12)  # rows 0, 3, 6, 9 have no trace
    rows = _rows(data)
    for i in (0, 3, 9):
        rows[i]["qry_cot"] = "It is one colour."
    _write(data, rows)
    with pytest.raises(TrainingDataError, match=rf"{data} line 7, column 'qry_cot': no reasoning trace, and "
                                                r"--distill_weight needs one"):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", "--distill_weight", "0.5"))


def test_each_image_file_is_checked_once(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data", n=6)
    rows = _rows(data)
    for row in rows:
        row["pos_image_path"] = "images/0.png"  # one file used by every row
    seen = []
    monkeypatch.setattr("tte_flash.data_check.image_problem", lambda path, decode=False: seen.append(path))
    from tte_flash.training import RowDataset
    _write(data, rows)
    RowDataset([data], data.parent)
    assert sorted(seen) == sorted({str(data.parent / "images" / f"{i}.png") for i in range(6)})


def test_image_problem_open_versus_decode(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert image_problem(str(tmp_path / "a.jpg")) is None and image_problem(str(tmp_path / "a.png")) is None
    assert image_problem(str(tmp_path / "a.jpg"), decode=True) is None
    _truncate(tmp_path / "a.jpg")
    assert "truncated" in image_problem(str(tmp_path / "a.jpg"))
    assert "truncated" in image_problem(str(tmp_path / "a.jpg"), decode=True)
    (tmp_path / "t.png").write_bytes(b"not an image")
    assert "cannot be read as an image" in image_problem(str(tmp_path / "t.png"))


def test_validate_off_checks_the_first_row_and_a_bad_row_mid_run_is_still_named(tmp_path):
    data = make_data(tmp_path / "data", n=8)
    (tmp_path / "data" / "images" / "5.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"training row {data} line 6: .*images/5.png"):
        train_main(args(data, tmp_path / "run", "--max_steps", "2", "--validate_data", "off",
                        "--per_device_train_batch_size", "8", "--save_strategy", "no"))


def test_validate_rows_accepts_the_generated_data(tmp_path):
    data = make_data(tmp_path / "data", n=12)
    validate_rows(_rows(data), str, data.parent, decode=True)  # no error


def test_undecodable_bytes_in_training_data_name_the_file_and_line(tmp_path, no_model):
    data = make_data(tmp_path / "data", n=6)
    lines = data.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"What", b"Wh\xffat")
    data.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=rf"{data}.*\b3\b.*UTF-8"):
        train_main(args(data, tmp_path / "run", "--max_steps", "1"))


# -- --resume_from_checkpoint ------------------------------------------------------------------------------

def test_resume_true_continues_from_the_newest_checkpoint(tmp_path):
    data = make_data(tmp_path / "data", n=16)
    run = tmp_path / "run"
    first = train_main(args(data, run, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"))
    assert (run / "checkpoint-4").is_dir()
    resumed = train_main(args(data, run, "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1",
                              "--resume_from_checkpoint", "true"))
    assert resumed.state.global_step == 6
    history = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert history[:4] == [1, 2, 3, 4] and history[4:] == [5, 6]  # steps 1-4 come from checkpoint-4's state
    assert losses(resumed, "loss")[:4] == losses(first, "loss")


@pytest.mark.parametrize("value, message", [
    ("true", "--resume_from_checkpoint true: no checkpoint-N folder in --output_dir"),
    ("/no/such/checkpoint", "--resume_from_checkpoint: checkpoint not found: /no/such/checkpoint"),
    ("DATA", "not a Trainer checkpoint \\(no trainer_state.json\\)"),
])
def test_resume_errors_are_clear_and_early(tmp_path, no_model, value, message):
    data = make_data(tmp_path / "data", n=4)
    value = str(data.parent) if value == "DATA" else value
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", "--resume_from_checkpoint", value))


def test_resume_false_is_a_fresh_run():
    assert training.resolve_resume("false", "anywhere") is None and training.resolve_resume(None, "x") is None
    assert training.resolve_resume(False, "x") is None

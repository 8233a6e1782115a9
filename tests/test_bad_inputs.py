"""Bad inputs -> clear errors (issue 18, items 6-7): one row per bad input, with the exception it must raise
and a fragment of the message that names the input, file or field. No case may end in a bare
AttributeError / TypeError / ZeroDivisionError / JSONDecodeError, a traceback from the CLI, or a silent result.

Groups: inputs to encode_query / encode_document / encode; checkpoints given to from_pretrained; the
``tte-flash`` CLI (run in-process: ``main`` must return 2 after one ``error:`` line on stderr); the training
entry point (rows are checked before the model is built, so these cases are cheap). Counted in README.md
("Reliability / Clear errors").
"""
import contextlib
import io
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from tte_flash import TTEFlashModel
from tte_flash.cli import main as cli_main
from tte_flash.data_check import TrainingDataError
from tte_flash.ranking import NonFiniteScoresError, hit_at_k, ndcg_at_k
from tte_flash.training import main as train_main

from test_training import args as train_args, make_data

NAN = float("nan")


class CliError(Exception):
    """A CLI run that returned non-zero with exactly one ``error:`` line on stderr and no traceback."""


@dataclass
class Env:
    model: TTEFlashModel
    saved: Path  # a saved copy of ``model`` (read-only: cases copy it)
    tmp: Path

    def checkpoint(self, change: Callable[[Path], None] | None = None) -> Path:
        """A copy of the saved checkpoint, changed by ``change(folder)``."""
        folder = self.tmp / "checkpoint"
        shutil.copytree(self.saved, folder)
        if change is not None:
            change(folder)
        return folder

    def cli(self, *argv) -> int:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli_main([str(a) for a in argv])
        lines = [line for line in err.getvalue().splitlines() if "error:" in line or "Traceback" in line]
        if code != 0 and len(lines) == 1 and "Traceback" not in err.getvalue():
            raise CliError(f"exit {code}: {lines[0]}")
        return code

    def train(self, change: Callable[[list, Path], None] | None = None, *extra) -> object:
        """train.py on 4 generated rows (line i+1 is row i), ``change(rows, data_folder)`` applied first."""
        data = make_data(self.tmp / "data", n=4)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        if change is not None:
            change(rows, data.parent)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return train_main(train_args(data, self.tmp / "run", "--max_steps", "1", *extra))


# -- helpers used by the table ------------------------------------------------------------------------------

def set_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update({k: v(config) if callable(v) else v for k, v in fields.items()})
        (folder / "config.json").write_text(json.dumps(config))
    return change


def write(name, content):
    def change(folder):
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return change


def pickle_only(folder, payload=None):
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if payload is None:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))


class Planted:
    """A pickle that would run code (it records that it ran) if anything unpickled it without weights_only."""
    ran = False

    def __reduce__(self):
        return (setattr, (Planted, "ran", True))


def truncate(name, keep=0.5):
    def change(folder):
        blob = (folder / name).read_bytes()
        (folder / name).write_bytes(blob[:int(len(blob) * keep)])
    return change


def drop_tensor(folder):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    del state[next(k for k in sorted(state) if "layers.0.mlp.down_proj" in k)]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def no_weights(folder):
    (folder / "model.safetensors").unlink()


def undecodable_jsonl(env) -> Path:
    path = env.tmp / "bad.jsonl"
    path.write_bytes(b'"fine"\n"caf\xe9 latin-1"\n')
    return path


def row(index, **fields):
    def change(rows, _root):
        rows[index].update(fields)
    return change


def truncated_image(rows, root):
    blob = (root / "images" / "2.png").read_bytes()
    (root / "images" / "2.png").write_bytes(blob[:len(blob) // 2])


def shards_untouched(env):
    out = env.tmp / "shards"
    try:
        env.model.encode_to_shards(["a", "b"], out, truncate_dim=65)
    finally:
        assert not out.exists() or not any(out.glob("shard-*")), "a shard was written before the error"


def train_undecodable(env):
    data = make_data(env.tmp / "data", n=4)
    lines = data.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"What", b"Wh\xffat")
    data.write_bytes(b"\n".join(lines))
    return train_main(train_args(data, env.tmp / "run", "--max_steps", "1"))


# -- the table: (name, action, expected exception, message fragment as a regex) ------------------------------
CASES = [
    # encode_query / encode_document / encode
    ("text=123", lambda e: e.model.encode_query({"text": 123}), ValueError, r"input 0: text must be a str, got int"),
    ("instruction=5 in an input", lambda e: e.model.encode_query({"text": "a", "instruction": 5}), ValueError,
     r"input 0: instruction must be a str, got int: 5"),
    ("instruction=5 argument", lambda e: e.model.encode_query("a", instruction=5), ValueError,
     r"instruction must be a str or None, got int: 5"),
    ("video=5", lambda e: e.model.encode_query({"video": 5}), ValueError,
     r"input 0: video must be a path .* got int: 5"),
    ("image=5", lambda e: e.model.encode_document({"image": 5}), ValueError,
     r"input 0: image must be a PIL image, a path, a URL, bytes or an array, got int"),
    ("0x0 image array", lambda e: e.model.encode(np.zeros((0, 0, 3), np.uint8)), ValueError,
     r"input 0: the image array is empty \(shape \(0, 0, 3\)\)"),
    ("0-pixel image tensor, 2nd input", lambda e: e.model.encode(["ok", torch.zeros(3, 0, 0)]), ValueError,
     r"input 1: the image array is empty \(shape \(3, 0, 0\)\)"),
    ("0x0 PIL image", lambda e: e.model.encode_query(Image.new("RGB", (0, 0))), ValueError,
     r"input 0: the image is 0x0 pixels"),
    ("0 bytes as an image", lambda e: e.model.encode_query({"image": b""}), ValueError, r"input 0: the image is 0 bytes"),
    ("missing image file", lambda e: e.model.encode_query(e.tmp / "gone.png"), FileNotFoundError, r"gone\.png"),
    ("empty text", lambda e: e.model.encode_query(["a", " "]), ValueError, r"input 1: empty input"),
    ("unknown input key", lambda e: e.model.encode_query({"txt": "a"}), ValueError, r"unknown keys \['txt'\]"),
    ("batch_size=None", lambda e: e.model.encode_query(["a"], batch_size=None), ValueError,
     r"batch_size must be a positive int, got None"),
    ("batch_size=0", lambda e: e.model.encode_document(["a"], batch_size=0), ValueError,
     r"batch_size must be a positive int, got 0"),
    ("truncate_dim above the width", lambda e: e.model.encode_query("a", truncate_dim=65), ValueError,
     r"truncate_dim=65 is larger than the embedding width 64"),
    ("truncate_dim above the width, shards", shards_untouched, ValueError,
     r"truncate_dim=65 is larger than the embedding width 64"),
    ("think_tokens out of range", lambda e: e.model.encode_query("a", think_tokens=99), ValueError,
     r"think_tokens=99 is out of range: .* 0 to max_think_tokens=32"),
    ("unknown mode", lambda e: e.model.encode_query("a", mode="cot"), ValueError, r"unknown mode 'cot'"),
    # non-finite scores and embeddings (issue 18 item 1, fixed in tte_flash.ranking)
    ("NaN embeddings in similarity", lambda e: e.model.similarity(np.full((2, 64), NAN), np.ones((3, 64))),
     NonFiniteScoresError, r"query embeddings.*\(query 0: NaN, query 1: NaN\)"),
    ("all-NaN scores in hit_at_k", lambda e: hit_at_k(torch.full((3, 8), NAN)), NonFiniteScoresError, r"NaN"),
    ("inf score in ndcg_at_k", lambda e: ndcg_at_k(torch.tensor([[1.0, float("inf"), 0.0]])), NonFiniteScoresError,
     r"inf"),
    # checkpoints (from_pretrained)
    ("checkpoint folder missing", lambda e: TTEFlashModel.from_pretrained(e.tmp / "nowhere"), FileNotFoundError,
     r"checkpoint not found: .*nowhere"),
    ("config.json missing", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(lambda f: (f / "config.json").unlink())),
     FileNotFoundError, r"checkpoint has no config\.json"),
    ("config.json garbage", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(write("config.json", "{garbage"))),
     ValueError, r"checkpoint/config\.json is not valid JSON \(line 1, column 2"),
    ("config.json a list", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(write("config.json", "[1, 2]"))),
     ValueError, r"config\.json holds a JSON list, not an object"),
    ("config.json not UTF-8", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(write("config.json", b"\xff\xfe"))),
     ValueError, r"config\.json is not UTF-8 text"),
    ("Qwen2-VL backbone to from_pretrained",
     lambda e: TTEFlashModel.from_pretrained(e.checkpoint(set_config(model_type="qwen2_vl"))), ValueError,
     r"is a 'qwen2_vl' checkpoint.*use TTEFlashModel\.from_backbone"),
    ("pickle-only weights", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(pickle_only)), ValueError,
     r"holds only pickle weights \(pytorch_model\.bin\), no model\.safetensors"),
    ("pickle with code, use_safetensors=False",
     lambda e: TTEFlashModel.from_pretrained(e.checkpoint(lambda f: pickle_only(f, {"w": Planted()})),
                                             use_safetensors=False),
     ValueError, r"refusing the weights of .*pytorch_model\.bin.*objects other than tensors"),
    ("truncated safetensors", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(truncate("model.safetensors"))),
     ValueError, r"cannot read the weights of .*\(model\.safetensors\): truncated or corrupt"),
    ("a tensor missing from the weights", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(drop_tensor)),
     ValueError, r"the weights lack 1 tensor of the model \(first: .*layers\.0\.mlp\.down_proj\.weight\); "
                 r"they would be random"),
    ("no weights file", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(no_weights)), FileNotFoundError,
     r"has no weights: no model\.safetensors"),
    ("think-token id out of range",
     lambda e: TTEFlashModel.from_pretrained(e.checkpoint(set_config(think_token_ids=lambda c: [10**6] + c["think_token_ids"][1:]))),
     ValueError, r"config field think_token_ids\[0\]=1000000 is outside the vocabulary \(ids 0 to \d+\)"),
    ("emb_token_id pointing at another token",
     lambda e: TTEFlashModel.from_pretrained(e.checkpoint(set_config(emb_token_id=65))), ValueError,
     r"config field emb_token_id=65 is the token 'b', not '<\|emb\|>' \(the tokenizer's id for it is \d+\)"),
    ("emb_token_id negative", lambda e: TTEFlashModel.from_pretrained(e.checkpoint(set_config(emb_token_id=-1))),
     ValueError, r"config field emb_token_id=-1 is outside the vocabulary"),
    ("think-token ids swapped",
     lambda e: TTEFlashModel.from_pretrained(e.checkpoint(set_config(
         think_token_ids=lambda c: [c["think_token_ids"][1], c["think_token_ids"][0], *c["think_token_ids"][2:]]))),
     ValueError, r"config field think_token_ids\[0\]=\d+ is the token '<\|think_1\|>', not '<\|think_0\|>'"),
    # the tte-flash CLI: one clear line, exit 2, no traceback
    ("CLI: pickle-only folder", lambda e: e.cli("encode", "--model", e.checkpoint(pickle_only), "hi", "--output",
                                                e.tmp / "o.npy"), CliError, r"exit 2: tte-flash encode: error: .*only pickle weights"),
    ("CLI: truncated safetensors", lambda e: e.cli("encode", "--model", e.checkpoint(truncate("model.safetensors", 0.9)),
                                                   "hi", "--output", e.tmp / "o.npy"), CliError,
     r"exit 2: tte-flash encode: error: cannot read the weights .* truncated or corrupt"),
    ("CLI: garbage config.json", lambda e: e.cli("encode", "--model", e.checkpoint(write("config.json", "nope")), "hi",
                                                 "--output", e.tmp / "o.npy"), CliError,
     r"exit 2: .*error: .*config\.json is not valid JSON"),
    ("CLI: folder without config.json", lambda e: e.cli("encode", "--model", e.tmp, "hi", "--output", e.tmp / "o.npy"),
     CliError, r"exit 2: .*error: .* has no config\.json"),
    ("CLI: think-token id out of range",
     lambda e: e.cli("encode", "--model", e.checkpoint(set_config(think_token_ids=lambda c: [-5] + c["think_token_ids"][1:])),
                     "hi", "--output", e.tmp / "o.npy"), CliError, r"exit 2: .*think_token_ids\[0\]=-5 is outside"),
    ("CLI: undecodable bytes in --input", lambda e: e.cli("encode", "--model", e.saved, "--input", undecodable_jsonl(e),
                                                          "--output", e.tmp / "o.npy"), CliError,
     r"exit 2: .*bad\.jsonl\D+2\b.*UTF-8"),
    # training: rows checked before the model is built, arguments validated
    ("train: qry=123", lambda e: e.train(row(1, qry=123)), TrainingDataError,
     r"train\.jsonl line 2, column 'qry': must be text .* got int 123"),
    ("train: empty target", lambda e: e.train(row(2, pos_text="", pos_image_path=None)), TrainingDataError,
     r"train\.jsonl line 3, column 'pos_text': the positive target is empty"),
    ("train: ragged negatives", lambda e: e.train(row(3, neg_text=["a", "b"], neg_image_path=["x.png", "y.png", "z.png"])),
     TrainingDataError, r"train\.jsonl line 4, column 'neg_text': .*different lengths"),
    ("train: qry_cot=5", lambda e: e.train(row(0, qry_cot=5)), TrainingDataError,
     r"train\.jsonl line 1, column 'qry_cot': must be text .* got int 5"),
    ("train: missing image", lambda e: e.train(row(3, qry_image_path="images/gone.png")), TrainingDataError,
     r"train\.jsonl line 4, column 'qry_image_path': media file not found: .*images/gone\.png"),
    ("train: truncated image", lambda e: e.train(truncated_image), TrainingDataError,
     r"train\.jsonl line 3, column 'qry_image_path': image .*images/2\.png cannot be read as an image"),
    ("train: undecodable bytes", train_undecodable, ValueError, r"train\.jsonl\D+3\b.*UTF-8"),
    ("train: --temperature 0", lambda e: e.train(None, "--temperature", "0"), ValueError,
     r"--temperature must be a finite number > 0, got 0"),
    ("train: --temperature -1", lambda e: e.train(None, "--temperature", "-1"), ValueError,
     r"--temperature must be a finite number > 0, got -1"),
    ("train: --cot_weight nan", lambda e: e.train(None, "--cot_weight", "nan"), ValueError,
     r"--cot_weight must be a finite number >= 0, got nan"),
    ("train: --resume_from_checkpoint true, no checkpoint", lambda e: e.train(None, "--resume_from_checkpoint", "true"),
     FileNotFoundError, r"--resume_from_checkpoint true: no checkpoint-N folder in --output_dir .*run"),
    ("train: --resume_from_checkpoint missing folder",
     lambda e: e.train(None, "--resume_from_checkpoint", str(e.tmp / "ckpt-9")), FileNotFoundError,
     r"--resume_from_checkpoint: checkpoint not found: .*ckpt-9"),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = TTEFlashModel.from_preset("tiny").eval()
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("name, action, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(saved_model, tmp_path, name, action, error, message):
    env = Env(model=saved_model[0], saved=saved_model[1], tmp=tmp_path)
    with pytest.raises(Exception) as caught:
        action(env)
    assert type(caught.value) is error or isinstance(caught.value, error), \
        f"{name}: expected {error.__name__}, got {type(caught.value).__name__}: {caught.value}"
    assert re.search(message, str(caught.value), re.S), f"{name}: message {str(caught.value)!r} lacks {message!r}"
    assert not Planted.ran, "a planted pickle ran"


def test_the_table_has_no_duplicate_names():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names))

"""Model cards: metadata parses with huggingface_hub, the snippet runs, push_to_hub uploads the card."""
import json
import re

import numpy as np
import pytest
from huggingface_hub import ModelCard

from tte_flash import TTEFlashModel
from tte_flash.card import CARD_MARKER, write_model_card

EVAL = {"runs": [{"dataset": "synthetic-grid", "mode": "latent", "think_tokens": 16,
                  "metrics": {"hit@1": 0.41, "ndcg@5": 0.62}, "shortcut_best": {"hit@1": 0.14}},
                 {"dataset": "synthetic-grid", "mode": "latent", "think_tokens": 0,
                  "metrics": {"hit@1": 0.30, "ndcg@5": 0.55}}]}


def test_card_metadata_and_model_index(tiny_model, tmp_path):
    (tmp_path / "eval_results.json").write_text(json.dumps(EVAL))
    tiny_model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers"  # save_pretrained writes its files (modules.json)
    assert data["pipeline_tag"] == "feature-extraction"
    assert {"tte-flash", "multimodal-embedding"} <= set(data["tags"]) and data["license"] == "apache-2.0"
    results = card.data.eval_results
    assert len(results) == 4 and {r.metric_type for r in results} == {"hit@1", "ndcg@5"}
    assert any(r.metric_value == 41.0 for r in results)  # 0-100, as the MMEB leaderboard
    assert {(r.dataset_type, r.dataset_name) for r in results} == {
        ("local:synthetic-grid", "synthetic-grid (local data)")}
    assert "| synthetic-grid | latent | 16 | hit@1 | 41.00 | 14.00 |" in card.text
    assert "Local evaluation data, not Hub datasets: synthetic-grid" in card.text
    assert "0-100 scale" in card.text
    assert CARD_MARKER in card.content


def test_document_retrieval_card_and_base_model(tiny_model, tmp_path):
    tiny_model.config.backbone_name_or_path = "Qwen/Qwen2-VL-2B-Instruct"
    try:
        path = write_model_card(tmp_path, tiny_model.config, eval_results={"runs": [
            {"dataset": "vidore", "metrics": {"ndcg@5": 0.5}, "think_tokens": 16}]})
    finally:
        tiny_model.config.backbone_name_or_path = None
    data = ModelCard.load(path).data.to_dict()
    assert data["pipeline_tag"] == "visual-document-retrieval"
    assert data["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"


def test_limitations_say_what_was_measured_and_local_backbones_are_not_base_models(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "not measured for this checkpoint" in text and "not recorded" in text
    (tmp_path / "cot_probe.json").write_text(json.dumps({"n": 100, "answer": 0.35}))
    (tmp_path / "train_summary.json").write_text(json.dumps({"train_data": ["data/train.jsonl"]}))
    tiny_model.config.backbone_name_or_path = str(tmp_path)  # a local directory is not a Hub id
    try:
        path = write_model_card(tmp_path, tiny_model.config)
    finally:
        tiny_model.config.backbone_name_or_path = None
    card = ModelCard.load(path)
    assert "right answer for 35% of 100 evaluation queries" in card.text and "data/train.jsonl" in card.text
    assert "base_model" not in card.data.to_dict() or card.data.to_dict()["base_model"] is None


def test_saved_model_reloads_from_the_cards_own_snippet(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the card's own snippet
    assert isinstance(namespace["model"], TTEFlashModel)
    np.testing.assert_array_equal(namespace["d"], tiny_model.encode_document(["a red car", "a bus"]))


def test_user_written_readme_is_kept(tiny_model, tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_card_command_keeps_a_hand_written_readme_unless_forced(tiny_model, tmp_path, capsys):
    from tte_flash.cli import main as cli_main
    tiny_model.save_pretrained(tmp_path, model_card=False)
    (tmp_path / "README.md").write_text("# my notes\n")
    assert cli_main(["card", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err and (tmp_path / "README.md").read_text() == "# my notes\n"
    assert cli_main(["card", str(tmp_path), "--force"]) == 0
    assert CARD_MARKER in (tmp_path / "README.md").read_text()
    assert cli_main(["card", str(tmp_path)]) == 0  # a generated card is regenerated without --force


def test_card_command_sets_license_languages_and_datasets(tiny_model, tmp_path, capsys):
    """`tte-flash card --license --language --datasets` reach the card's metadata; a bad license id is a clear
    error and leaves the previous card in place."""
    from huggingface_hub import metadata_load
    from tte_flash.cli import main as cli_main
    tiny_model.save_pretrained(tmp_path)
    assert cli_main(["card", str(tmp_path), "--license", "mit", "--language", "en", "fr",
                     "--datasets", "TIGER-Lab/MMEB-train"]) == 0
    meta = metadata_load(tmp_path / "README.md")
    assert (meta["license"], meta["language"], meta["datasets"]) == ("mit", ["en", "fr"], ["TIGER-Lab/MMEB-train"])
    assert cli_main(["card", str(tmp_path)]) == 0  # regenerated: what was chosen stays
    type(tiny_model).from_pretrained(tmp_path).save_pretrained(tmp_path)  # so does a save into the same folder
    meta = metadata_load(tmp_path / "README.md")
    assert (meta["license"], meta["language"], meta["datasets"]) == ("mit", ["en", "fr"], ["TIGER-Lab/MMEB-train"])
    before = (tmp_path / "README.md").read_text()
    assert cli_main(["card", str(tmp_path), "--license", "Apache 2.0"]) == 2
    assert "license" in capsys.readouterr().err and (tmp_path / "README.md").read_text() == before


def test_push_to_hub_uploads_generated_card(tiny_model, tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
            from pathlib import Path
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return "ok"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    (tmp_path / "eval_results.json").write_text(json.dumps(EVAL))
    assert tiny_model.push_to_hub("me/tte-tiny", results_dir=tmp_path) == "ok"
    assert {"model.safetensors", "config.json", "README.md", "eval_results.json"} <= set(uploaded)
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in uploaded)
    card = uploaded["README.md"].decode()
    assert 'from_pretrained("me/tte-tiny")' in card and "hit@1" in card


LATENCY = {"rows": [{"device": "cpu", "config": "K=16", "batch_size": 4, "median_ms": 12.5, "p90_ms": 14.0}]}


def test_full_card_validates_offline_and_reports_what_was_recorded(tiny_model, tmp_path):
    from tte_flash.card import validate_card
    (tmp_path / "eval_results.json").write_text(json.dumps(EVAL))
    (tmp_path / "latency_results.json").write_text(json.dumps(LATENCY))
    (tmp_path / "cot_probe.json").write_text(json.dumps({"n": 40, "answer": 0.125}))
    (tmp_path / "train_summary.json").write_text(json.dumps(
        {"train_data": ["TIGER-Lab/MMEB-train", "data/train.jsonl", "/abs/other.parquet"], "train_rows": 12}))
    tiny_model.save_pretrained(tmp_path)
    tiny_model.config.backbone_name_or_path = "Qwen/Qwen2-VL-2B-Instruct"
    try:
        path = write_model_card(tmp_path, tiny_model.config, model_id="me/tte-tiny")
    finally:
        tiny_model.config.backbone_name_or_path = None
    card = validate_card(path)  # offline: YAML, ModelCardData round trip incl. model-index, field shapes
    data = card.data.to_dict()
    from huggingface_hub import metadata_load
    assert metadata_load(path) == data  # the raw YAML (huggingface_hub's own reader) is what ModelCardData holds
    assert data["language"] == ["en"] and data["datasets"] == ["TIGER-Lab/MMEB-train"]  # local files are not
    assert data["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and data["library_name"] == "sentence-transformers"
    text = card.text
    n_parameters = sum(p.numel() for p in tiny_model.parameters())
    assert f"| Parameters | {n_parameters:,} |" in text
    assert f"| Embedding dimension | {tiny_model.config.text_config.hidden_size} |" in text
    assert "| cpu | K=16 | 4 | 12.5 | 14.0 |" in text  # the latency table
    assert "right answer for 12% of 40 evaluation queries" in text  # limitations from the probe, not fixed text
    citation = re.search(r"## Citation\n.*?```bibtex\n(.*?)```", text, re.S).group(1)
    assert citation.count("@article{") == 3 and citation.count("{") == citation.count("}")
    assert "arXiv:2510.05014" in citation and "arXiv:2507.04590" in citation and "Think Then Embed" in citation
    assert "arXiv:2605.16638" in citation and "TTE-Flash" in citation
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections == ["Model details", "Think-token settings", "Usage", "Training", "Evaluation", "Latency",
                        "Limitations", "Citation"]


def test_validate_card_names_every_problem():
    from tte_flash.card import validate_card
    bad = ("---\nlicense: Apache 2.0\nlanguage: [english]\nbase_model: ./ckpt\n"
           "datasets: [/data/train.jsonl, org/data]\ntags: [1, ok]\nmodel-index:\n- name: m\n  results:\n"
           "  - task: {type: feature-extraction}\n    metrics: [{type: hit@1, value: 0.5}]\n---\ntext\n")
    with pytest.raises(ValueError) as error:
        validate_card(bad)
    message = str(error.value)
    for expected in ("model-index: does not parse", "license: 'Apache 2.0'", "language: 'english'", "tags: 1",
                     "base_model: './ckpt'", "datasets: '/data/train.jsonl'"):
        assert expected in message, (expected, message)
    assert "org/data" not in message
    with pytest.raises(ValueError, match="does not parse"):
        validate_card("---\nlicense: [unclosed\n---\ntext\n")
    with pytest.raises(ValueError, match="does not parse"):
        validate_card("---\n- a list\n---\ntext\n")


def test_bad_card_options_are_refused_before_writing(tiny_model, tmp_path):
    from tte_flash.card import build_model_card, validate_card
    validate_card(build_model_card(tiny_model.config, license="mit", languages=["fr"]))
    with pytest.raises(ValueError, match="license: 'Apache 2.0'"):
        write_model_card(tmp_path, tiny_model.config, license="Apache 2.0")
    with pytest.raises(ValueError, match="datasets: '../data/x' is not a Hub dataset id"):
        write_model_card(tmp_path, tiny_model.config, datasets=["../data/x"])
    assert not (tmp_path / "README.md").exists()


def test_sentence_transformers_snippet_of_the_card_runs(tiny_model, tmp_path):
    pytest.importorskip("sentence_transformers")
    tiny_model.save_pretrained(tmp_path)
    snippets = re.findall(r"```python\n(.*?)```", (tmp_path / "README.md").read_text(), re.S)
    assert len(snippets) == 2 and "SentenceTransformer(" in snippets[1]
    namespace = {}
    exec(compile(snippets[1], "README.md", "exec"), namespace)  # noqa: S102 - the card's own snippet
    def unit(x):  # sentence-transformers returns raw vectors unless normalize_embeddings=True; cosine is the same
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit(namespace["d"]), tiny_model.encode_document(["a red car", "a bus"]), atol=1e-5)
    image = namespace["image"]
    native_q = tiny_model.encode_query([{"text": "Which vehicle is second-closest to the camera?", "image": image}])
    np.testing.assert_allclose(unit(namespace["q"]), native_q, atol=1e-5)
    # without the sentence-transformers files there is no such snippet, and the Hub library is transformers
    path = write_model_card(tmp_path, tiny_model.config, sentence_transformers=False)
    card = ModelCard.load(path)
    assert "SentenceTransformer(" not in card.text and card.data.library_name == "transformers"


def test_model_index_one_scale_and_hub_dataset_ids(tiny_model, tmp_path):
    """Every model-index value on 0-100 (MMEB-V2's and evaluate's alike); dataset.type a Hub dataset id when
    the data is one, else local:<name>, never a bare file stem; validate_card refuses a bare stem."""
    from huggingface_hub import metadata_load
    from tte_flash.card import build_model_card, validate_card
    runs = {"runs": [{"dataset": "me/vqa-eval", "think_tokens": 16, "metrics": {"hit@1": 0.625}},
                     {"dataset": "eval", "think_tokens": 16, "metrics": {"hit@1": 0.5}}]}
    mmeb = {16: {"fingerprint": {"think_tokens": 16, "limit": None},
                 "aggregate": {"overall": {"score": 0.5, "n": 78, "selected": 78, "of": 78}}}}
    card = validate_card(build_model_card(tiny_model.config, eval_results=runs, mmeb_v2=mmeb))
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results == {"me/vqa-eval": 62.5, "local:eval": 50.0, "TIGER-Lab/MMEB-V2": 50.0}
    path = tmp_path / "README.md"
    card.save(path)
    types = [r["dataset"]["type"] for r in metadata_load(path)["model-index"][0]["results"]]
    assert sorted(types) == ["TIGER-Lab/MMEB-V2", "local:eval", "me/vqa-eval"]
    stem = path.read_text().replace("type: local:eval", "type: eval")
    with pytest.raises(ValueError, match="dataset.type 'eval' is neither a Hub dataset id"):
        validate_card(stem)

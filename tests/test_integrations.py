"""Integrations: trust_remote_code without the package, sentence-transformers, MTEB (all offline)."""
import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import random_image
from tte_flash import TTEFlashModel
from tte_flash.integrations import write_integration_files

REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    class BlockTTEFlash:  # `import tte_flash` fails, as for a user without the package
        def find_spec(self, name, path=None, target=None):
            if name == "tte_flash" or name.startswith("tte_flash."):
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, BlockTTEFlash())
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig, AutoModel
    ckpt, out = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    image = Image.open(f"{ckpt}/../image.png")
    inputs = ["a cat on a mat", image, {"text": "what is shown?", "image": image}]
    query4 = model.encode_query(inputs, think_tokens=4)
    import os
    os.environ["TTE_FLASH_ATTN"] = "triton"  # without the package the kernel shim falls back to the reference
    query4_triton = model.encode_query(inputs, think_tokens=4)
    del os.environ["TTE_FLASH_ATTN"]
    np.savez(out, query=model.encode_query(inputs), query4=query4, query4_triton=query4_triton,
             document=model.encode_document(inputs))
    model.save_pretrained(f"{out}.resaved")  # a remote-code model re-saves (its code via transformers)
    resaved = AutoModel.from_pretrained(f"{out}.resaved", trust_remote_code=True).eval()
    np.testing.assert_allclose(resaved.encode_query(inputs), np.load(out)["query"], atol=1e-6)
    loaded = [m for m in sys.modules if m == "tte_flash" or m.startswith("tte_flash.")]
    assert not loaded, loaded
    print(type(config).__module__, type(model).__module__)
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny model with the integration files, and inputs (text, image, fused)."""
    torch.manual_seed(0)
    model = TTEFlashModel.from_preset("tiny").eval()
    root = tmp_path_factory.mktemp("integrations")
    model.save_pretrained(root / "ckpt")
    write_integration_files(root / "ckpt", model.config)  # the save_pretrained hook, idempotent
    image = random_image(np.random.default_rng(0), 45, 61)
    image.save(root / "image.png")
    inputs = ["a cat on a mat", image, {"text": "what is shown?", "image": image}, "short"]
    return model, root / "ckpt", inputs


def test_remote_code_files_and_auto_map(checkpoint):
    _, ckpt, _ = checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_tte_flash.TTEFlashConfig",
                                  "AutoModel": "modeling_tte_flash.TTEFlashModel"}
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))  # safetensors only
    for path in ckpt.glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "tte_flash" for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and id(node) not in guarded:
                assert (node.module or "").split(".")[0] != "tte_flash", (path.name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.level and node.module:  # relative: a flat file beside it
                assert node.level == 1 and (ckpt / f"{node.module}.py").is_file(), (path.name, node.module)


def test_checkpoint_carries_only_the_code_to_load_and_run(checkpoint, tmp_path):
    """No save-time code (model card, remote-code writer, save hook) in a checkpoint; every flat file is
    reached from the auto_map / modules.json entries by imports; stale generated files go on re-save."""
    import re
    model, ckpt, _ = checkpoint
    names = {p.name for p in ckpt.glob("*.py")}
    assert not names & {"tte_flash_card.py", "tte_flash_integrations_remote_code.py", "tte_flash_integrations.py"}
    assert {"modeling_tte_flash.py", "configuration_tte_flash.py", "tte_flash_save_hooks.py",
            "tte_flash_integrations_sentence_transformers.py"} <= names
    # an independent reachability walk over the written files (regex, as transformers' loader reads them)
    entries = [v.split(".")[0] + ".py" for v in json.loads((ckpt / "config.json").read_text())["auto_map"].values()]
    entries += [m["type"].split(".")[0] + ".py" for m in json.loads((ckpt / "modules.json").read_text())]
    reached, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [f"{m}.py" for m in re.findall(r"^\s*from\s+\.(\w+)\s+import", (ckpt / name).read_text(), re.M)]
    assert reached == names, (names - reached, reached - names)
    (ckpt / "tte_flash_card.py").write_text("# Generated from tte_flash.card by an older tte-flash\n")
    (ckpt / "my_helper.py").write_text("x = 1\n")  # not generated: kept
    try:
        write_integration_files(ckpt, model.config)
        assert not (ckpt / "tte_flash_card.py").exists() and (ckpt / "my_helper.py").exists()
    finally:
        (ckpt / "my_helper.py").unlink()


def test_trust_remote_code_without_package(checkpoint, tmp_path):
    model, ckpt, inputs = checkpoint
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "out.npz")], cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    remote = np.load(tmp_path / "out.npz")
    native_inputs = inputs[:3]
    np.testing.assert_allclose(remote["query"], model.encode_query(native_inputs), atol=1e-5)
    np.testing.assert_allclose(remote["query4"], model.encode_query(native_inputs, think_tokens=4), atol=1e-5)
    np.testing.assert_allclose(remote["query4_triton"], remote["query4"], atol=1e-5)
    np.testing.assert_allclose(remote["document"], model.encode_document(native_inputs), atol=1e-5)


def test_sentence_transformers_matches_native(checkpoint):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    model, ckpt, inputs = checkpoint
    st = SentenceTransformer(str(ckpt), trust_remote_code=True, device="cpu")
    assert st.get_embedding_dimension() == model.config.text_config.hidden_size
    unit = {"normalize_embeddings": True}  # as the native API (config.normalize_embeddings); ST's default is raw
    cases = {
        "query K=16": (model.encode_query(inputs), st.encode_query(inputs, **unit)),
        "query K=4": (model.encode_query(inputs, think_tokens=4), st.encode_query(inputs, think_tokens=4, **unit)),
        "query by prompt_name": (model.encode_query(inputs), st.encode(inputs, prompt_name="query", batch_size=3,
                                                                       **unit)),
        "document": (model.encode_document(inputs), st.encode_document(inputs, **unit)),
        "document by prompt_name": (model.encode_document(inputs), st.encode(inputs, prompt_name="document", **unit)),
        "plain encode": (model.encode(inputs), st.encode(inputs, **unit)),
        "prompt as instruction": (model.encode_query(inputs, instruction="Find the picture"),
                                  st.encode_query(inputs, prompt="Find the picture", **unit)),
        "raw (normalize_embeddings=False)": (model.encode_query(inputs, normalize_embeddings=False),
                                             st.encode_query(inputs)),
    }
    for name, (native, via_st) in cases.items():
        np.testing.assert_allclose(via_st, native, atol=1e-5, err_msg=name)
    assert np.abs(cases["query K=16"][0] - cases["query K=4"][0]).max() > 1e-3  # the budget reaches the model
    assert np.abs(cases["query K=16"][0] - cases["document"][0]).max() > 1e-3
    with pytest.raises(ValueError, match="think_tokens"):
        st.encode_query(inputs, think_tokens=model.config.max_think_tokens + 1)


def test_sentence_transformers_in_memory_and_resave(checkpoint, tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from tte_flash.integrations.sentence_transformers import save_for_sentence_transformers, to_sentence_transformer
    model, _, inputs = checkpoint
    st = to_sentence_transformer(model)
    np.testing.assert_allclose(st.encode_query(inputs, normalize_embeddings=True), model.encode_query(inputs),
                               atol=1e-5)
    save_for_sentence_transformers(model, tmp_path / "st")
    reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(reloaded.encode_document(inputs, normalize_embeddings=True),
                               model.encode_document(inputs), atol=1e-5)


def test_sentence_transformers_surface_as_st_users_expect(checkpoint, tmp_path):
    """max_seq_length get/set (truncates text like sentence-transformers, saved and reloaded), chat messages
    (the "message" modality it lists), normalize_embeddings honoured, output_value='token_embeddings' a clear
    error, a NaN embedding an error naming the rows."""
    pytest.importorskip("sentence_transformers")
    import copy
    import warnings
    from sentence_transformers import SentenceTransformer
    from tte_flash.integrations.sentence_transformers import to_sentence_transformer
    from tte_flash.ranking import NonFiniteScoresError
    model, ckpt, inputs = checkpoint
    st = SentenceTransformer(str(ckpt), trust_remote_code=True, device="cpu")
    texts = ["a cat on a mat beside a dog under a table in the kitchen", "short"]
    # normalize_embeddings: raw by default (sentence-transformers' default), unit when asked
    raw, unit = st.encode_document(texts), st.encode_document(texts, normalize_embeddings=True)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(raw, model.encode_document(texts, normalize_embeddings=False), atol=1e-5)
    # max_seq_length: the processor's limit by default; 8 cuts the text to its first 8 tokens, silently
    assert st.max_seq_length == model.processor.max_query_tokens
    st.max_seq_length = 8
    assert st.max_seq_length == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = st.encode_query(texts, normalize_embeddings=True)
    first8 = model.processor.tokenizer(texts[0], add_special_tokens=False).input_ids[:8]
    assert len(model.processor.tokenizer(texts[0], add_special_tokens=False).input_ids) > 8
    np.testing.assert_allclose(cut, model.encode_query([model.processor.tokenizer.decode(first8), texts[1]]),
                               atol=1e-5)
    with pytest.warns(UserWarning, match="truncated"):  # the native API warns; ST's max_seq_length is silent
        native_cut = model.encode_query(texts, max_length=8 + model.config.default_think_tokens + 1)
    np.testing.assert_allclose(cut, native_cut, atol=1e-5)
    assert np.abs(cut[0] - model.encode_query(texts[:1])[0]).max() > 1e-3
    st.save(str(tmp_path / "st8"))
    assert SentenceTransformer(str(tmp_path / "st8"), trust_remote_code=True, device="cpu").max_seq_length == 8
    st.max_seq_length = None
    assert st.max_seq_length == model.processor.max_query_tokens
    with pytest.raises(ValueError, match="max_seq_length"):
        st.max_seq_length = 0
    # output_value: None gives per-input dicts; token embeddings do not exist
    with pytest.raises(ValueError, match="token_embeddings"):
        st.encode(texts, output_value="token_embeddings")
    rows = st.encode(texts, output_value=None)
    np.testing.assert_allclose(torch.stack([r["sentence_embedding"] for r in rows]).numpy(), raw, atol=1e-5)
    # chat messages ("message" is in st.modalities): system -> instruction, text and image parts
    assert "message" in st.modalities
    image = inputs[1]
    parts = [{"type": "image", "image": image}, {"type": "text", "text": "what is shown?"}]
    messages = [[{"role": "user", "content": "short"}],  # a list of conversations (a list of messages each)
                [{"role": "system", "content": "Find the picture"}, {"role": "user", "content": parts}]]
    np.testing.assert_allclose(st.encode_query(messages, normalize_embeddings=True), np.stack([
        model.encode_query("short"), model.encode_query({"text": "what is shown?", "image": image},
                                                        instruction="Find the picture")]), atol=1e-5)
    mixed = ["a cat on a mat", image, {"text": "what is shown?", "image": image},
             {"role": "user", "content": [{"type": "text", "text": "short"}]}]
    np.testing.assert_allclose(st.encode_document(mixed, normalize_embeddings=True),
                               model.encode_document(inputs[:3] + ["short"]), atol=1e-5)
    with pytest.raises(ValueError, match="more than one image"):
        st.encode([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image}]}])
    # NaN weights: an error naming the rows, never a vector
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.language_model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="sentence-transformers embeddings"):
        to_sentence_transformer(broken).encode_document(texts)

def _batch(rows):
    return {key: [row.get(key) for row in rows] for key in ("text", "image", "video")}


def test_mteb_encoder_batches(checkpoint):
    pytest.importorskip("mteb")
    from mteb.types import PromptType
    from torch.utils.data import DataLoader
    from tte_flash.integrations.mteb import TTEFlashMTEB
    model, _, inputs = checkpoint
    image = inputs[1]
    frames = torch.as_tensor(np.random.default_rng(1).integers(0, 256, (4, 3, 32, 40), dtype=np.uint8))
    rows = [{"text": "a cat"}, {"image": image}, {"text": "what is shown?", "image": image}, {"video": frames},
            {"text": "describe", "video": frames}]
    loader = DataLoader(rows, batch_size=2, collate_fn=_batch)
    encoder = TTEFlashMTEB(model, use_task_instructions=False)
    queries = encoder.encode(loader, task_metadata=None, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.query)
    documents = encoder.encode(loader, task_metadata=None, hf_split="test", hf_subset="default",
                               prompt_type=PromptType.document)
    from tte_flash.integrations.mteb import video_frames
    native_inputs = [{k: v for k, v in r.items()} for r in rows]
    for item in native_inputs:
        if "video" in item:
            item["video"] = video_frames(item["video"])
    np.testing.assert_allclose(queries, model.encode_query(native_inputs), atol=1e-5)
    np.testing.assert_allclose(documents, model.encode_document(native_inputs), atol=1e-5)


def test_mteb_evaluate_in_memory_image_tasks(checkpoint):
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.classification import MockImageClassificationTask
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask
    from tte_flash.integrations.mteb import TTEFlashMTEB
    model, _, _ = checkpoint
    results = mteb.evaluate(TTEFlashMTEB(model), [MockAny2AnyRetrievalT2ITask(), MockImageClassificationTask()],
                            cache=None, show_progress_bar=False)
    scores = {r.task_name: r.get_score() for r in results.task_results}
    assert set(scores) == {"MockAny2AnyRetrievalT2I", "MockImageClassification"}
    assert all(0.0 <= s <= 1.0 for s in scores.values()), scores


def test_sentence_transformers_multi_process_pool(checkpoint):
    """sentence-transformers' multi-process pool (the model pickled into spawned workers) encodes the same
    vectors: the remote code's attention name is the same in every process (not the salted hash())."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    model, ckpt, inputs = checkpoint
    st = SentenceTransformer(str(ckpt), trust_remote_code=True, device="cpu")
    texts = ["a cat on a mat", "short", "what is shown?", "a red square"]
    pool = st.start_multi_process_pool(["cpu", "cpu"])
    try:
        pooled = st.encode_document(texts, pool=pool, batch_size=2, normalize_embeddings=True)
    finally:
        st.stop_multi_process_pool(pool)
    np.testing.assert_allclose(pooled, model.encode_document(texts), atol=1e-5)


def _mock_tasks():
    from mteb.mocks.mock_tasks.classification import MockImageClassificationTask
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask
    return [MockAny2AnyRetrievalT2ITask(), MockImageClassificationTask()]


def _record_encodings(encoder):
    """Wrap ``encoder.encode`` to keep every call's output, keyed by (task, prompt_type)."""
    calls, encode = {}, encoder.encode

    def recording(inputs, *, task_metadata, prompt_type=None, **kwargs):
        out = encode(inputs, task_metadata=task_metadata, prompt_type=prompt_type, **kwargs)
        calls.setdefault((task_metadata.name, str(prompt_type)), []).append(np.asarray(out))
        return out
    encoder.encode = recording
    return calls


def test_mteb_get_model_loads_a_registered_checkpoint(checkpoint, monkeypatch):
    """The real mteb route: register -> mteb.get_model_meta / mteb.get_model -> mteb.evaluate."""
    mteb = pytest.importorskip("mteb")
    from mteb.models.model_meta import ModelMeta
    from tte_flash.integrations.mteb import TTEFlashMTEB, register
    model, ckpt, _ = checkpoint
    with pytest.raises(KeyError, match="not found"):
        mteb.get_model_meta(f"tte-flash/{ckpt.name}")  # unknown before register
    from mteb.models.model_implementations import MODEL_REGISTRY
    meta = register(str(ckpt))
    monkeypatch.setitem(MODEL_REGISTRY, meta.name, meta)  # removed again after the test
    assert mteb.get_model_meta(meta.name) is meta and meta.loader is TTEFlashMTEB
    assert meta.name == f"tte-flash/{ckpt.name}" and meta.revision.startswith("local-")
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())  # from the safetensors headers
    assert meta.embed_dim == model.config.text_config.hidden_size and meta.license == "apache-2.0"
    assert meta.languages == ["eng-Latn"] and set(meta.modalities) == {"text", "image", "video"}
    assert "arXiv:2510.05014" in meta.citation and "arXiv:2507.04590" in meta.citation
    assert meta.training_datasets is None  # not recorded: unknown, not "zero-shot"
    # mteb asks for its image/video extras (torchvision, torchcodec) before loading a model with those
    # modalities; this one needs neither: with every extra made to look absent, get_model still loads it
    monkeypatch.setattr(ModelMeta, "_missing_dependencies", staticmethod(lambda groups: [f"<{g}>" for g in groups]))
    plain = ModelMeta(**{**dict(meta), "name": "org/plain-mteb-meta"})  # mteb's own class: it would refuse
    with pytest.raises(ImportError, match="<image>, <video>"):
        plain.load_model()
    with pytest.raises(ImportError, match="<image>"):  # an extra the model itself names is still checked
        meta.model_copy(update={"extra_requirements_groups": ["image"]}).load_model()
    with pytest.raises(TypeError, match="unknown options \\['think_token'\\]"):
        mteb.get_model(meta.name, think_token=4)  # a misspelt option is not silently ignored
    assert meta.max_tokens == model.processor.max_query_tokens  # the limit the processor truncates at
    encoder = mteb.get_model(meta.name, think_tokens=4)
    assert isinstance(encoder, TTEFlashMTEB) and encoder.think_tokens == 4
    assert encoder.mteb_model_meta.model_name_with_experiment == f"{meta.name} (think_tokens=4)"
    calls = _record_encodings(encoder)
    results = mteb.evaluate(encoder, _mock_tasks(), cache=None, show_progress_bar=False)
    assert {r.task_name for r in results.task_results} == {"MockAny2AnyRetrievalT2I", "MockImageClassification"}
    # the loaded checkpoint encodes what the in-memory model does (same weights, same K)
    direct = TTEFlashMTEB(model, think_tokens=4)
    direct_calls = _record_encodings(direct)
    mteb.evaluate(direct, _mock_tasks(), cache=None, show_progress_bar=False)
    assert set(calls) == set(direct_calls) and len(calls) == 3
    for key in calls:
        np.testing.assert_allclose(np.concatenate(calls[key]), np.concatenate(direct_calls[key]), atol=1e-5,
                                   err_msg=str(key))


def test_mteb_sentence_transformers_route_is_image_capable(checkpoint):
    """A SentenceTransformer of this model: mteb's own wrapper declares text only (image tasks refused);
    sentence_transformer_encoder declares the model's modalities and encodes what TTEFlashMTEB does."""
    mteb = pytest.importorskip("mteb")
    pytest.importorskip("sentence_transformers")
    import json as _json
    from mteb.models.model_meta import ModelMeta
    from sentence_transformers import SentenceTransformer
    from tte_flash.integrations.mteb import TTEFlashMTEB, sentence_transformer_encoder
    model, ckpt, _ = checkpoint
    st = SentenceTransformer(str(ckpt), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match="supports \\['text'\\]"):
        mteb.evaluate(st, _mock_tasks(), cache=None, show_progress_bar=False)
    via_st = sentence_transformer_encoder(st)
    assert set(via_st.mteb_model_meta.modalities) == {"text", "image", "video"}
    st_calls = _record_encodings(via_st)
    mteb.evaluate(via_st, _mock_tasks(), cache=None, show_progress_bar=False)
    native = TTEFlashMTEB(model, use_task_instructions=False)
    native_calls = _record_encodings(native)
    mteb.evaluate(native, _mock_tasks(), cache=None, show_progress_bar=False)
    assert set(st_calls) == set(native_calls) == {("MockAny2AnyRetrievalT2I", "query"),
                                                  ("MockAny2AnyRetrievalT2I", "document"),
                                                  ("MockImageClassification", "None")}
    for key in native_calls:  # the ST route gives raw vectors (cosine scores: the same), the native one unit ones
        via = np.concatenate(st_calls[key])
        np.testing.assert_allclose(via / np.linalg.norm(via, axis=1, keepdims=True), np.concatenate(native_calls[key]),
                                   atol=1e-5, err_msg=str(key))
    # the Hub route: mteb reads the modalities of an unregistered model from sentence_bert_config.json
    files = {name: _json.loads((ckpt / name).read_text()) for name in
             ("config_sentence_transformers.json", "sentence_bert_config.json", "modules.json", "config.json")}
    loader, model_type, modalities = ModelMeta._resolve_loader(
        "org/tte", files["config_sentence_transformers.json"], files["sentence_bert_config.json"],
        files["modules.json"], files["config.json"])
    assert loader.__name__ == "SentenceTransformerEncoderWrapper" and set(modalities) == {"text", "image", "video"}


def test_mteb_instructions_only_on_queries(checkpoint):
    """Queries (and symmetric tasks) get the task's instruction, documents none, not even their own prompt
    or an instruction column (as mteb's GME wrapper); vectors checked against the native API."""
    pytest.importorskip("mteb")
    from mteb.types import PromptType
    from torch.utils.data import DataLoader
    from tte_flash.integrations.mteb import TTEFlashMTEB
    model, _, inputs = checkpoint
    task = _mock_tasks()[0]
    metadata = task.metadata.model_copy(update={"prompt": {"query": "Find the picture", "document": "Represent it"}})
    rows = [{"text": "a cat", "instruction": "Row instruction"}, {"image": inputs[1], "instruction": None},
            {"text": "what is shown?", "image": inputs[1], "instruction": None}]
    loader = DataLoader(rows, batch_size=2, collate_fn=lambda b: {k: [r.get(k) for r in b] for k in
                                                                   ("text", "image", "instruction")})
    encoder = TTEFlashMTEB(model)
    encode = {t: encoder.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default", prompt_type=t)
              for t in (PromptType.query, PromptType.document, None)}
    plain = [{k: v for k, v in r.items() if k != "instruction" and v is not None} for r in rows]
    expected_query = np.concatenate([model.encode_query(plain[:1], instruction="Row instruction"),
                                     model.encode_query(plain[1:], instruction="Find the picture")])
    np.testing.assert_allclose(encode[PromptType.query], expected_query, atol=1e-5)
    np.testing.assert_allclose(encode[PromptType.document], model.encode_document(plain), atol=1e-5)
    assert np.abs(encode[PromptType.document] - model.encode_document(plain, instruction="Represent it")).max() > 1e-4
    # symmetric tasks (no prompt_type) embed as queries: the query prompt of a per-role prompt dict
    np.testing.assert_allclose(encode[None], expected_query, atol=1e-5)


def test_mteb_model_meta_reads_the_card_and_rejects_bad_input(checkpoint, tmp_path):
    pytest.importorskip("mteb")
    import shutil
    from tte_flash.card import write_model_card
    from tte_flash.integrations.mteb import model_meta, register
    model, ckpt, _ = checkpoint
    copy = tmp_path / "ckpt-de"
    shutil.copytree(ckpt, copy)
    write_model_card(copy, model.config, license="mit", languages=["de", "en"], datasets=["TIGER-Lab/MMEB-train"])
    meta = model_meta(str(copy), training_datasets=set())
    assert meta.license == "mit" and meta.languages == ["deu-Latn", "eng-Latn"] and meta.training_datasets == set()
    assert meta.public_training_data == "https://huggingface.co/datasets/TIGER-Lab/MMEB-train"
    assert model_meta(str(ckpt)).public_training_data is None  # no datasets recorded
    before = meta.revision
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # retrained weights: a new revision for mteb's result cache
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_meta(str(copy)).revision != before
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="'qwen2_vl' checkpoint, not a TTE-Flash"):
        register(str(tmp_path / "qwen"))
    with pytest.raises(FileNotFoundError, match="no TTE-Flash checkpoint"):
        register(str(tmp_path / "missing"))
    (copy / "README.md").write_text("---\nlicense: [unclosed\n---\n# notes\n")
    with pytest.raises(ValueError, match="README.md: the model card's metadata does not parse"):
        model_meta(str(copy))


def test_sentence_transformer_encoder_refuses_other_models():
    pytest.importorskip("mteb")
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.base.modules import Normalize  # sentence-transformers >= 6
    except ImportError:
        from sentence_transformers.models import Normalize
    from tte_flash.integrations.mteb import sentence_transformer_encoder
    other = st.SentenceTransformer(modules=[Normalize()], device="cpu")
    with pytest.raises(ValueError, match="first module is Normalize"):
        sentence_transformer_encoder(other)

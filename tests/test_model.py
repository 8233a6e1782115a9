"""TTEFlashModel against plain transformers Qwen2-VL and against itself across batchings."""
import numpy as np
import pytest
import torch
from conftest import random_image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from tte_flash import TTEFlashConfig, TTEFlashModel
from tte_flash.mask import COT, EMB, THINK
from tte_flash.processing import collate


def plain_inputs(model, item, think_tokens, tail=None):
    """input_ids/vision kwargs of `[query][think][emb]` (or `[query][think] + tail` when given)
    for a plain transformers Qwen2-VL forward, with its own position computation."""
    record = model.processor(item)
    tail = model.processor.think_token_ids[:think_tokens] + (
        [model.processor.emb_token_id] if tail is None else list(tail))
    ids = torch.cat([record.input_ids, torch.tensor(tail, dtype=torch.long)])[None]
    kwargs = {"input_ids": ids, "mm_token_type_ids": torch.cat([record.mm_types, torch.zeros(len(tail))]).long()[None]}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if getattr(record, name) is not None:
            kwargs[name] = getattr(record, name)
    return kwargs


@pytest.fixture(scope="module")
def plain_model(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model.save_pretrained(path)
    return Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("think_tokens", [0, 1, 16, 32])
@pytest.mark.parametrize("with_image", [False, True])
def test_export_equivalence_plain_transformers(tiny_model, plain_model, rng, think_tokens, with_image):
    item = {"text": "Which vehicle is second-closest to the camera?", "instruction": "Find the answer."}
    if with_image:
        item["image"] = random_image(rng)
    ours = tiny_model.encode_query(item, think_tokens=think_tokens, normalize_embeddings=False)
    with torch.no_grad():
        out = plain_model(**plain_inputs(tiny_model, item, think_tokens), output_hidden_states=True)
    np.testing.assert_allclose(ours, out.hidden_states[-1][0, -1].numpy(), atol=1e-5, rtol=1e-5)


def test_k0_text_model_equals_transformers_sdpa_at_every_token(tiny_model, plain_model, rng):
    """K=0, no COT: the package's attention reproduces transformers' own Qwen2-VL (sdpa) everywhere."""
    item = {"text": "a query of some length", "image": random_image(rng)}
    record = tiny_model.processor(item)
    batch = collate([record], tiny_model.processor.think_token_ids, tiny_model.processor.emb_token_id, think_tokens=0)
    with torch.no_grad():
        ours = tiny_model._last_hidden(batch)
        theirs = plain_model(**plain_inputs(tiny_model, item, 0), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bidirectional_think_changes_embedding_and_is_not_plain_causal(fresh_tiny, rng):
    causal, bidir = fresh_tiny(), fresh_tiny(think_bidirectional=True)
    bidir.load_state_dict(causal.state_dict())
    item = {"text": "q", "image": random_image(rng)}
    a, b = causal.encode_query(item, think_tokens=4), bidir.encode_query(item, think_tokens=4)
    assert np.abs(a - b).max() > 1e-4
    # with K<=1 the two masks coincide
    np.testing.assert_allclose(causal.encode_query(item, think_tokens=1), bidir.encode_query(item, think_tokens=1),
                               atol=1e-6)


def test_batch_invariance_alone_padded_packed(tiny_model, rng):
    items = [{"text": "Which vehicle is second-closest?", "image": random_image(rng)}, "a plain text query",
             random_image(rng), {"instruction": "Retrieve the caption.", "image": random_image(rng), "text": "x"},
             "y", "a somewhat longer plain text query with many more bytes in it than the others"]
    for k in (0, 3, 16):
        alone = np.stack([tiny_model.encode_query(x, think_tokens=k) for x in items])
        packed = tiny_model.encode_query(items, think_tokens=k, batch_size=4)
        padded = tiny_model.encode_query(items, think_tokens=k, batch_size=3, packed=False)
        np.testing.assert_allclose(packed, alone, atol=1e-5)
        np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_filled_rows_equal_one_sample_per_row(tiny_model, rng):
    """collate(fill_rows=True) puts several short samples in one padded row; every <emb> state, COT
    prediction and target equals the one-sample-per-row batch's, in record order, with images in any row."""
    proc = tiny_model.processor
    # a small image first and larger ones later: rows are filled longest first, so the vision inputs must follow
    # the rows' order, not the records'
    items = [{"text": "q", "image": random_image(rng, 30, 30)}, "a", "bb cc",
             {"image": random_image(rng, 120, 100), "text": "x"}, "a somewhat longer plain text query with more bytes",
             random_image(rng, 60, 60), "dd", {"text": "Which vehicle is second-closest?", "image": random_image(rng, 40, 90)}]
    records = [proc(x) for x in items]
    for trial in range(3):
        ks = [int(k) for k in rng.integers(0, 6, len(records))]
        cots = [None if rng.random() < 0.4 else [int(t) for t in rng.integers(10, 200, int(rng.integers(1, 9)))]  # bytes
                for _ in records]
        one = collate(records, proc.think_token_ids, proc.emb_token_id, think_tokens=ks, cot_ids=cots, packed=False)
        filled = collate(records, proc.think_token_ids, proc.emb_token_id, think_tokens=ks, cot_ids=cots,
                         packed=False, fill_rows=True)
        assert filled.input_ids.shape[1] == one.input_ids.shape[1] and filled.input_ids.shape[0] < len(records)
        torch.testing.assert_close(filled.cot_targets, one.cot_targets)
        with torch.no_grad():
            a, b = tiny_model.tte_forward(one), tiny_model.tte_forward(filled)
            ha, hb = tiny_model._last_hidden(one), tiny_model._last_hidden(filled)
        torch.testing.assert_close(b.embeddings, a.embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hb[filled.cot_pred_index], ha[one.cot_pred_index], atol=1e-5, rtol=1e-5)
        if one.cot_targets.numel():
            torch.testing.assert_close(b.cot_nll_sum, a.cot_nll_sum, atol=1e-4, rtol=1e-5)


def test_encode_outputs_follow_sentence_transformers_habits(tiny_model):
    single = tiny_model.encode_document("a red car")
    assert single.shape == (64,) and single.dtype == np.float32
    many = tiny_model.encode_document(["a red car", "a blue bus"], convert_to_tensor=True)
    assert isinstance(many, torch.Tensor) and many.shape == (2, 64)
    torch.testing.assert_close(many.norm(dim=-1), torch.ones(2))
    raw = tiny_model.encode_document(["a red car"], normalize_embeddings=False)
    truncated = tiny_model.encode_document(["a red car"], truncate_dim=16)
    np.testing.assert_allclose(truncated[0], raw[0, :16] / np.linalg.norm(raw[0, :16]), atol=1e-6)
    scores = tiny_model.similarity(tiny_model.encode_query(["q1", "q2", "q3"]), many)
    assert scores.shape == (3, 2) and scores.dtype == torch.float32
    np.testing.assert_allclose(tiny_model.similarity(single, single).numpy(), [[1.0]], atol=1e-6)


def test_appended_positions_match_qwen2vl_rope_index(tiny_model, rng):
    """[query][think][emb] positions equal Qwen2-VL's own get_rope_index on the same tokens."""
    item = {"text": "what is here", "image": random_image(rng, 100, 60), "instruction": "Look."}
    k = 5
    batch = collate([tiny_model.processor(item)], tiny_model.processor.think_token_ids,
                    tiny_model.processor.emb_token_id, think_tokens=k)
    kwargs = plain_inputs(tiny_model, item, k)
    theirs, _ = tiny_model.model.get_rope_index(kwargs["input_ids"], mm_token_type_ids=kwargs["mm_token_type_ids"],
                                                image_grid_thw=kwargs["image_grid_thw"])
    torch.testing.assert_close(batch.position_ids, theirs)


def test_cot_positions_and_emb_share_position(tiny_model):
    record = tiny_model.processor("text query")
    p = record.next_position
    batch = collate([record], tiny_model.processor.think_token_ids, tiny_model.processor.emb_token_id,
                    think_tokens=3, cot_ids=[[10, 11, 12]])
    types, pos = batch.token_types[0], batch.position_ids[0, 0]
    assert pos[types == THINK].tolist() == [p, p + 1, p + 2]
    assert pos[types == EMB].tolist() == [p + 3]
    assert pos[types == COT].tolist() == [p + 3, p + 4, p + 5]
    emb = int((types == EMB).nonzero())
    assert batch.cot_pred_index.tolist() == [emb - 1, emb + 1, emb + 2]  # COT_1 from THINK_K, then COT_{j-1}


@pytest.mark.parametrize("think_tokens", [0, 4])
def test_cot_loss_equals_plain_causal_lm_on_query_think_cot(tiny_model, plain_model, rng, think_tokens):
    """With causal think tokens and cot_sees_query, the COT branch is exactly a causal LM on
    [query][think][cot] (EMB invisible to COT): its NLL must equal plain transformers' loss."""
    item = {"text": "reason about this", "image": random_image(rng)}
    cot = tiny_model.processor.tokenize_cot("first this, then that")
    batch = collate([tiny_model.processor(item), tiny_model.processor("another one")],
                    tiny_model.processor.think_token_ids, tiny_model.processor.emb_token_id,
                    think_tokens=think_tokens, cot_ids=[cot, None])
    with torch.no_grad():
        ours = tiny_model.tte_forward(batch).cot_loss
        kwargs = plain_inputs(tiny_model, item, think_tokens, tail=cot)
        logits = plain_model(**kwargs).logits[0, -len(cot) - 1:-1]
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(logits, torch.tensor(cot)))


def test_generate_cot_equals_transformers_greedy_generate(tiny_model, plain_model, rng):
    item = {"text": "why", "image": random_image(rng)}
    k, n = 3, 6
    ours = tiny_model._decode_from_think([tiny_model.processor(item)], k, n)[0]
    kwargs = plain_inputs(tiny_model, item, k, tail=[])  # [query][think] without <emb>
    eos = tiny_model.processor.tokenizer.eos_token_id
    with torch.no_grad():
        out = plain_model.generate(**kwargs, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    theirs = out[0, kwargs["input_ids"].shape[1]:].tolist()
    theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
    assert ours == theirs


def test_generate_cot_and_explicit_cot_run(tiny_model, rng):
    items = [{"text": "Which vehicle is second-closest?", "image": random_image(rng)}, "plain"]
    texts = tiny_model.generate_cot(items, think_tokens=4, max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    explicit = tiny_model.encode_query(items, mode="explicit-cot", max_cot_tokens=5)
    latent = tiny_model.encode_query(items, think_tokens=0)
    assert explicit.shape == (2, 64)
    assert np.isfinite(explicit).all()
    assert np.abs(explicit - latent).max() > 0  # the trace changed the embedding input


def test_explicit_cot_embeds_query_plus_generated_trace(tiny_model, rng):
    item = {"text": "why", "image": random_image(rng)}
    record = tiny_model.processor(item)
    trace = tiny_model._generate_trace_ids([record], 5, 1, False)[0]
    from tte_flash.modeling import _append_text
    batch = collate([_append_text(record, trace)], tiny_model.processor.think_token_ids,
                    tiny_model.processor.emb_token_id, think_tokens=0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(tiny_model.tte_forward(batch).embeddings, dim=-1)[0].numpy()
    np.testing.assert_allclose(tiny_model.encode_query(item, mode="explicit-cot", max_cot_tokens=5), expected,
                               atol=1e-6)


def test_save_load_round_trip_bit_identical(tiny_model, tmp_path, rng):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = TTEFlashModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tte_fields = [f for f in TTEFlashConfig.__dataclass_fields__ if f not in Qwen2VLConfig.__dataclass_fields__]
    assert tte_fields and all(getattr(loaded.config, f) == getattr(tiny_model.config, f) for f in tte_fields)
    assert loaded.config.text_config.to_diff_dict() | {"dtype": None} == \
        tiny_model.config.text_config.to_diff_dict() | {"dtype": None}
    item = {"text": "q", "image": random_image(rng)}
    assert np.array_equal(loaded.encode_query(item, think_tokens=9), tiny_model.encode_query(item, think_tokens=9))
    from transformers import AutoModel
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, TTEFlashModel)


def test_from_backbone_on_tiny_saved_qwen2vl(tiny_model, tmp_path, rng):
    from tte_flash.tokenization import build_byte_tokenizer
    tte_only = set(TTEFlashConfig.__dataclass_fields__) - set(Qwen2VLConfig.__dataclass_fields__)
    config = {k: v for k, v in tiny_model.config.to_dict().items()
              if k not in tte_only | {"model_type", "architectures"}}
    qcfg = Qwen2VLConfig(**config)
    qcfg.text_config.vocab_size = 263  # exactly the tokenizer: new tokens force a resize
    torch.manual_seed(3)
    backbone = Qwen2VLForConditionalGeneration(qcfg).eval()
    backbone.save_pretrained(tmp_path)
    build_byte_tokenizer().save_pretrained(tmp_path)

    model = TTEFlashModel.from_backbone(tmp_path, max_think_tokens=8, image_max_pixels=50176)
    assert model.config.max_think_tokens == 8 and len(model.config.think_token_ids) == 8
    assert model.get_input_embeddings().num_embeddings >= len(model.processor.tokenizer) == 263 + 9
    torch.testing.assert_close(model.model.language_model.layers[0].self_attn.q_proj.weight,
                               backbone.model.language_model.layers[0].self_attn.q_proj.weight)
    new_rows = model.get_input_embeddings().weight[model.config.think_token_ids]
    assert torch.isfinite(new_rows).all() and new_rows.std(0).mean() > 0  # distinct, finite rows
    item = {"text": "hello", "image": random_image(rng)}
    emb = model.encode_query(item, think_tokens=8)
    assert emb.shape == (64,) and np.isfinite(emb).all()
    # query tokens are unchanged: the backbone's hidden state at the last query token is reproduced
    record = model.processor(item)
    batch = collate([record], model.processor.think_token_ids, model.processor.emb_token_id, think_tokens=0)
    with torch.no_grad():
        ours = model._last_hidden(batch)[record.input_ids.numel() - 1]
        kwargs = plain_inputs(model, item, 0, tail=[])
        theirs = backbone(**kwargs, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_embedding_layer_reads_an_earlier_layer(fresh_tiny, rng):
    last, early = fresh_tiny(), fresh_tiny(embedding_layer=-2)
    early.load_state_dict(last.state_dict())
    item = {"text": "q", "image": random_image(rng)}
    record = last.processor(item)
    batch = collate([record], last.processor.think_token_ids, last.processor.emb_token_id, think_tokens=2)
    with torch.no_grad():
        hidden = last.model.language_model(
            inputs_embeds=last._embed_with_vision(batch), position_ids=batch.position_ids,
            attention_mask={"full_attention": __import__("tte_flash.attention").attention.TTELayout(
                batch.seq_ids, batch.token_types)}, output_hidden_states=True).hidden_states
        expected = last.model.language_model.norm(hidden[-2][0, -1])
    np.testing.assert_allclose(early.encode_query(item, think_tokens=2, normalize_embeddings=False), expected.numpy(),
                               atol=1e-5)


def test_small_preset_equals_plain_transformers(tmp_path, rng):
    """The `small` CPU-experiment preset (4 layers, 128 wide) is a standard Qwen2-VL too."""
    torch.manual_seed(3)
    model = TTEFlashModel.from_preset("small").eval()
    assert model.config.text_config.num_hidden_layers == 4 and model.config.text_config.hidden_size == 128
    model.save_pretrained(tmp_path)
    plain = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    item = {"text": "What colour is the cell left of the red cell?", "image": random_image(rng)}
    ours = model.encode_query(item, think_tokens=16, normalize_embeddings=False)
    with torch.no_grad():
        out = plain(**plain_inputs(model, item, 16), output_hidden_states=True)
    np.testing.assert_allclose(ours, out.hidden_states[-1][0, -1].numpy(), atol=1e-5, rtol=1e-5)


def test_backend_without_triton(monkeypatch):
    """Where triton is not installed (macOS, Windows), CUDA falls back to the reference attention with a
    warning, and asking for triton explicitly is a clear error."""
    import importlib.util

    from tte_flash import attention
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.delenv("TTE_FLASH_ATTN", raising=False)
    attention._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert attention.resolve_backend(None, torch.device("cuda")) == "reference"
    with pytest.raises(ImportError, match="needs the triton package"):
        attention.resolve_backend("triton", torch.device("cuda"))
    assert attention.resolve_backend(None, torch.device("cpu")) == "reference"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU on this CPU machine for the backend choice: ``gpu`` (capability, name) is what torch reports,
    changeable within a test; the kernels' once-per-GPU reading is cleared before, after, and by ``gpu["reread"]()``."""
    import importlib

    from tte_flash import attention
    kernels = importlib.import_module("tte_flash.kernels.tte_attention")
    gpu = {"capability": (9, 0), "name": "NVIDIA H100 80GB HBM3", "kernels": kernels,
           "reread": kernels._gpu_problem.cache_clear}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("TTE_FLASH_ATTN", raising=False)
    attention._warn_once.cache_clear()
    kernels._gpu_problem.cache_clear()
    yield gpu
    kernels._gpu_problem.cache_clear()  # no fake GPU left behind


@pytest.mark.parametrize("capability, name", [((7, 5), "Tesla T4"), ((7, 0), "Tesla V100-SXM2-16GB")])
def test_backend_on_a_gpu_older_than_the_kernels_support(monkeypatch, fake_gpu, capability, name):
    """On a GPU below compute capability 8.0 (Triton compiles no tensor-core dots there and the tiles exceed its
    shared memory) CUDA falls back to the reference attention with a warning naming the GPU, and asking for
    triton, on the model or through $TTE_FLASH_ATTN, is a clear error; 8.0 and newer keep the kernels."""
    from tte_flash import attention
    kernel_module = fake_gpu["kernels"]
    fake_gpu.update(capability=capability, name=name)
    major, minor = capability
    with pytest.warns(UserWarning, match=rf"reference attention .*cuda:0 \({name}\) is {major}\.{minor}"):
        assert attention.resolve_backend(None, torch.device("cuda")) == "reference"
    with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer.*cuda:1 .* use attn_backend='reference'"):
        attention.resolve_backend("triton", torch.device("cuda", 1))
    monkeypatch.setenv("TTE_FLASH_ATTN", "triton")
    with pytest.raises(RuntimeError, match=rf"{name}"):
        attention.resolve_backend(None, torch.device("cuda"))
    assert kernel_module.unsupported_gpu(torch.device("cpu")) is None
    # the kernels' own entry refuses such a GPU too, before any launch (a CPU tensor stands in for its device)
    unsupported_gpu = kernel_module.unsupported_gpu
    monkeypatch.setattr(kernel_module, "unsupported_gpu", lambda device: f"{name} is too old")
    q = torch.randn(3, 2, 16)
    with pytest.raises(RuntimeError, match=f"{name} is too old"):
        kernel_module.tte_attention(q, q, q, torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.uint8))
    monkeypatch.setattr(kernel_module, "unsupported_gpu", unsupported_gpu)
    monkeypatch.delenv("TTE_FLASH_ATTN", raising=False)
    for newer in ((8, 0), (8, 6), (9, 0), (12, 0)):
        fake_gpu["capability"] = newer
        fake_gpu["reread"]()
        assert kernel_module.unsupported_gpu(torch.device("cuda")) is None
        assert attention.resolve_backend(None, torch.device("cuda")) == "triton"


def test_backend_with_a_triton_older_than_the_kernels_compile_with(monkeypatch, fake_gpu):
    """Triton 3.2 and 3.3 (PyTorch 2.6 and 2.7) cannot compile the kernels (tl.make_tensor_descriptor and tl.range's
    warp_specialize are missing): the reference attention on such a machine, with a warning naming the version, and
    an error if triton is asked for; 3.4 and newer keep the kernels."""
    import triton

    from tte_flash import attention
    for version, kept in (("3.3.1", False), ("3.2.0", False), ("3.4.0", True), ("3.10.0", True)):
        monkeypatch.setattr(triton, "__version__", version)
        attention._warn_once.cache_clear()
        fake_gpu["reread"]()
        if kept:
            assert attention.resolve_backend(None, torch.device("cuda")) == "triton"
            continue
        with pytest.warns(UserWarning, match=rf"need triton 3\.4 or newer .*triton {version} is installed"):
            assert attention.resolve_backend(None, torch.device("cuda")) == "reference"
        with pytest.raises(RuntimeError, match=rf"triton {version} is installed"):
            attention.resolve_backend("triton", torch.device("cuda"))


def test_backend_on_rocm(monkeypatch, fake_gpu):
    """On ROCm (its GPUs are cuda devices) the kernels' NVIDIA tiles and dot settings do not compile or do not fit
    (benchmarks/rocm_compile.py): the reference attention by default, with a warning, and an error if asked for."""
    from tte_flash import attention
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    fake_gpu.update(capability=(9, 4), name="AMD Instinct MI300X")
    with pytest.warns(UserWarning, match=r"reference attention .*ROCm \(cuda:0, AMD Instinct MI300X\)"):
        assert attention.resolve_backend(None, torch.device("cuda")) == "reference"
    with pytest.raises(RuntimeError, match=r"built for NVIDIA GPUs.*use attn_backend='reference'"):
        attention.resolve_backend("triton", torch.device("cuda", 0))

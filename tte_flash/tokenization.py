"""Tokenizer helpers: the TTE special tokens and an offline byte-level tokenizer for presets.

Think tokens and ``<emb>`` are real tokenizer tokens with their own embedding rows, so a checkpoint
with ``think_bidirectional=False`` is a standard Qwen2-VL checkpoint whose vocabulary contains them.
Presets (random init, no downloads) use a byte-level BPE tokenizer without merges that carries
Qwen2-VL's special tokens; real checkpoints keep their own tokenizer (``from_backbone``).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EMB_TOKEN = "<|emb|>"
QWEN2_VL_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                           "<|image_pad|>", "<|video_pad|>")


def think_token(index: int) -> str:
    """The text of the ``index``-th (0-based) think token."""
    return f"<|think_{index}|>"


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) with Qwen2-VL's special tokens; fully offline."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(byte_to_char))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def add_tte_tokens(tokenizer, max_think_tokens: int) -> tuple[list[int], int]:
    """Add the think tokens and ``<emb>`` (idempotent); return (think_token_ids, emb_token_id)."""
    wanted = [think_token(i) for i in range(max_think_tokens)] + [EMB_TOKEN]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(wanted)
    return ids[:-1], ids[-1]


def train_word_tokenizer(texts, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (an iterable of str) in which frequent words are single
    tokens; the 256 byte tokens stay in the vocabulary, so any UTF-8 text still round-trips.
    Carries Qwen2-VL's special tokens like :func:`build_byte_tokenizer`. Deterministic for the same texts."""
    from tokenizers import trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(QWEN2_VL_SPECIAL_TOKENS))
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer

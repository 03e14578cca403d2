"""Tokenizers: lossless round trips, reserved special tokens, caching, loaded files, strict errors."""
import hashlib
import os

import pytest

from dsv3.data.corpus import embedded_corpus, split_documents
from dsv3.errors import DataError
from dsv3.data.tokenizer import (EOS, FIM_BEGIN, FIM_END, FIM_HOLE, get_tokenizer, tokenizer_sample, train_bpe)

EDGE_CASES = ["a\u2581b ▁▁ c", "x\r\ny\t\t z  \n\n", "é中文😀", "  lead", "trail  ", "\x00\x01\x7f",
              "\u3000full\u00a0width", "\ufeffbom", "    def f(x):\n        return x  # 123456\n",
              f"{FIM_BEGIN}a{FIM_HOLE}b{FIM_END}c{EOS}", ""]


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus()


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    train, _ = split_documents(corpus.documents, 0.02)
    cache = str(tmp_path_factory.mktemp("cache"))
    return get_tokenizer("bpe", 512, train, corpus.sha256, cache, 4.0), cache


def test_bpe_lossless_on_whole_embedded_corpus(corpus, bpe):
    tok, _ = bpe
    texts = [d.text for d in corpus.documents]
    ids = tok.encode_batch(texts)
    decoded = tok.decode_batch(ids)
    mismatched = [d.name for d, text, back in zip(corpus.documents, texts, decoded) if text != back]
    assert mismatched == []
    # Byte for byte against the files on disk: the same total and the same per-file sha256.
    by_path = {f["path"]: f for f in corpus.files}
    for doc, back in zip(corpus.documents, decoded):
        raw = back.encode("utf-8")
        assert hashlib.sha256(raw).hexdigest() == by_path[doc.name]["sha256"]
    n_tokens = sum(map(len, ids))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert n_bytes == sum(f["bytes"] for f in corpus.files)
    # A 512-token byte-level BPE compresses Python source to about 2 bytes per token (measured 2.07).
    assert 1.8 < n_bytes / n_tokens < 2.6


def test_bpe_edge_cases_and_reserved_ids(bpe):
    tok, _ = bpe
    for text in EDGE_CASES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 512
    assert (tok.eos_id, tok.fim_ids) == (0, (1, 2, 3))
    assert tok.encode(f"{FIM_BEGIN}x{EOS}")[0] == 1 and tok.encode(f"{FIM_BEGIN}x{EOS}")[-1] == 0


def test_bpe_cached_by_key(corpus, bpe):
    tok, cache = bpe
    files = os.listdir(os.path.join(cache, "tokenizers"))
    assert files == [f"bpe-v512-s4mb-{corpus.sha256[:16]}.json"]
    again = get_tokenizer("bpe", 512, [], corpus.sha256, cache, 4.0)  # no documents: must come from cache
    assert again.fingerprint == tok.fingerprint


def test_sample_is_deterministic_and_sized(corpus):
    a = tokenizer_sample(corpus.documents, 0.3)
    b = tokenizer_sample(list(reversed(corpus.documents)), 0.3)
    assert a == b
    assert sum(map(len, a)) == 300_000


def test_sentencepiece_lossless_on_sample(corpus, tmp_path):
    train, _ = split_documents(corpus.documents, 0.02)
    tok = get_tokenizer("sentencepiece", 600, train, corpus.sha256, str(tmp_path), 0.5)
    assert tok.vocab_size == 600
    texts = tokenizer_sample(corpus.documents, 2.0) + EDGE_CASES
    decoded = tok.decode_batch(tok.encode_batch(texts))
    assert sum(a != b for a, b in zip(texts, decoded)) == 0
    assert tok.eos_id is not None and tok.fim_ids is not None
    assert tok.decode([tok.eos_id, *tok.fim_ids]) == EOS + FIM_BEGIN + FIM_HOLE + FIM_END
    # A saved .model loads back as a file tokenizer with the same ids.
    model = os.path.join(tmp_path, "tokenizers", os.listdir(os.path.join(tmp_path, "tokenizers"))[0])
    loaded = get_tokenizer(model, 600, [], "", str(tmp_path), 0.5)
    assert loaded.kind == "sentencepiece-file"
    assert loaded.encode(texts[0]) == tok.encode(texts[0])


def test_loaded_tokenizer_json_and_vocab_check(bpe, tmp_path):
    tok, cache = bpe
    path = os.path.join(cache, "tokenizers", os.listdir(os.path.join(cache, "tokenizers"))[0])
    loaded = get_tokenizer(path, 1024, [], "", str(tmp_path), 1.0)
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == 512
    with pytest.raises(DataError, match=r"has 512 tokens, more than model.vocab_size=500; raise model.vocab_size to at least 512"):
        get_tokenizer(path, 500, [], "", str(tmp_path), 1.0)


def test_deepseek_style_token_names_are_found(tmp_path):
    """DeepSeek-V3's tokenizer.json spells its tokens with fullwidth bars and ▁."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
    hf.train_from_iterator(["def f(x):\n    return x\n"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = get_tokenizer(path, 1000, [], "", str(tmp_path), 1.0)
    assert (tok.eos_id, tok.fim_ids) == (1, (3, 2, 4))
    assert tok.decode(tok.encode("  x = 1\n")) == "  x = 1\n"


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer 'nope.json': expected 'bpe', 'sentencepiece', or the path"):
        get_tokenizer("nope.json", 512, [], "", str(tmp_path), 1.0)
    with pytest.raises(DataError, match=r"model.vocab_size=200 is too small .* raise it to at least 261"):
        train_bpe(["abc"], 200)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        get_tokenizer(str(bad), 512, [], "", str(tmp_path), 1.0)

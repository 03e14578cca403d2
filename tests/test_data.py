"""Data pipeline: embedded corpus manifest, packing, sampler resume, FIM, validation entropy, errors."""
import collections
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from dsv3.config import DataConfig
from dsv3.data.corpus import split_documents, user_corpus
from dsv3.data.dataset import apply_fim_text, encode_documents, prepare_data
from dsv3.errors import DataError
from dsv3.data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE

WORDS = ["def", "return", "self", "value", "import", "class", "if", "else", "for", "in", "x", "y", "0", "1"]


def write_corpus(root, n_files=24, lines=40, seed=0):
    """Folders alpha/ and beta/ of .py/.txt files, and a jsonl with a 'src' domain field."""
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        folder = os.path.join(root, "alpha" if i % 2 else "beta")
        os.makedirs(folder, exist_ok=True)
        text = "".join("    " * int(rng.integers(0, 3)) + " ".join(rng.choice(WORDS, 6)) + "\n" for _ in range(lines))
        with open(os.path.join(folder, f"f{i:02d}.{'py' if i % 3 else 'txt'}"), "w") as f:
            f.write(text)
    with open(os.path.join(root, "records.jsonl"), "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, 200)), "src": f"web{i % 2}"}) + "\n")
    return root


def small_cfg(tmp_path, **kw):
    root = tmp_path / "corpus"
    if not root.exists():
        write_corpus(str(root))
    args = dict(path=str(root), cache_dir=str(tmp_path / "cache"), seq_len=32, val_fraction=0.15)
    args.update(kw)
    return DataConfig(**args)


class _Work:
    """Counts the expensive steps of prepare_data: BPE training (and the characters it sees) and
    document encoding (and the documents encoded); ``forbid`` makes either one raise instead."""

    def __init__(self, monkeypatch, forbid: bool = False):
        import dsv3.data.dataset
        import dsv3.data.tokenizer
        self.bpe_calls, self.bpe_chars, self.encoded_docs = 0, 0, 0
        train_bpe, encode = dsv3.data.tokenizer.train_bpe, dsv3.data.dataset.encode_documents

        def counted_bpe(texts, vocab_size):
            assert not forbid, "the cache hit trained the tokenizer again"
            self.bpe_calls += 1
            self.bpe_chars += sum(map(len, texts))
            return train_bpe(texts, vocab_size)

        def counted_encode(tok, docs, fim_rate, seed):
            assert not forbid, "the cache hit encoded documents again"
            self.encoded_docs += len(docs)
            return encode(tok, docs, fim_rate, seed)
        monkeypatch.setattr(dsv3.data.tokenizer, "train_bpe", counted_bpe)
        monkeypatch.setattr(dsv3.data.dataset, "encode_documents", counted_encode)


def _files(root: str) -> dict:
    """Every file under root: (inode, size, mtime in ns) by path — a rewrite changes the inode or mtime."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    base = tmp_path_factory.mktemp("embedded")
    with pytest.MonkeyPatch.context() as mp:
        work = _Work(mp)
        ds = prepare_data(DataConfig(cache_dir=str(base / "cache")), 512, str(base / "run"))
    return ds, str(base / "run"), work


def test_embedded_corpus_manifest(embedded):
    ds, run_dir, work = embedded
    # What preparation costs, counted rather than timed (a wall-clock bound depends on the machine and
    # its load; the time is a benchmark's): one BPE training on a sample of at most
    # data.tokenizer_sample_mb, and every document of the corpus encoded exactly once.
    cfg = DataConfig()
    assert work.bpe_calls == 1 and 0 < work.bpe_chars <= cfg.tokenizer_sample_mb * 1e6
    assert work.encoded_docs == len(ds.corpus.documents)
    with open(os.path.join(run_dir, "corpus.json")) as f:
        manifest = json.load(f)
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) and "json/__init__.py" in paths and "os.py" in paths
    assert not [p for p in paths if {"test", "tests", "idle_test", "site-packages"} & set(p.split("/")[:-1])]
    root = manifest["source"].removeprefix("embedded:")
    with open(os.path.join(root, "json/decoder.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert next(f["sha256"] for f in manifest["files"] if f["path"] == "json/decoder.py") == digest
    assert manifest["sha256"] == ds.corpus.sha256 and manifest["n_train_tokens"] == ds.n_train_tokens
    assert set(ds.val_domains) <= {p.split("/")[0].removesuffix(".py") for p in paths}
    assert len(ds.val_domains) == (ds.n_val_tokens - 1) // ds.seq_len


def test_packed_stream_is_the_corpus_joined_with_eos(embedded):
    ds, _, _ = embedded
    train_docs, val_docs = split_documents(ds.corpus.documents, 0.02)
    assert len(val_docs) == round(0.02 * len(ds.corpus.documents))
    assert ds.tokenizer.decode(ds.train_tokens.tolist()) == "".join(d.text + EOS for d in train_docs)
    assert ds.tokenizer.decode(ds.val_tokens.tolist()) == "".join(d.text + EOS for d in val_docs)
    assert int((np.asarray(ds.train_tokens) == ds.tokenizer.eos_id).sum()) == len(train_docs)


def test_cache_hit_rebuilds_nothing_and_is_identical(embedded, monkeypatch):
    """A second prepare_data on the same corpus and config trains no tokenizer, encodes no document and
    writes no file into the cache (every file's inode, size and mtime unchanged, none added)."""
    ds, _, _ = embedded
    cache_dir = os.path.dirname(os.path.dirname(ds.pack_dir))
    before = _files(cache_dir)
    _Work(monkeypatch, forbid=True)
    again = prepare_data(DataConfig(cache_dir=cache_dir), 512, None)
    assert _files(cache_dir) == before
    assert again.pack_dir == ds.pack_dir and again.index["shards"] == ds.index["shards"]


def test_packing_is_deterministic(tmp_path):
    a = prepare_data(small_cfg(tmp_path, cache_dir=str(tmp_path / "c1")), 400)
    b = prepare_data(small_cfg(tmp_path, cache_dir=str(tmp_path / "c2")), 400)
    assert a.index["shards"] == b.index["shards"]
    with open(os.path.join(a.pack_dir, "train.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == a.index["shards"]["train"]["sha256"]
    assert np.array_equal(a.val_tokens, b.val_tokens)
    assert a.n_train_tokens > 0 and a.train_tokens.dtype == np.uint16


def test_user_corpus_domains_and_split(tmp_path):
    cfg = small_cfg(tmp_path, domain_field="src")
    corpus = user_corpus(cfg.path, "src")
    assert len(corpus.documents) == 24 + 8
    assert {d.domain for d in corpus.documents} == {"alpha", "beta", "web0", "web1"}
    train, val = split_documents(corpus.documents, cfg.val_fraction)
    assert len(val) == round(0.15 * 32) and len(train) + len(val) == 32
    assert split_documents(list(reversed(corpus.documents)), 0.15)[1] == list(reversed(val))
    ds = prepare_data(cfg, 400)
    assert set(ds.val_domains) <= {d.domain for d in val}
    assert ds.domains == sorted({d.domain for d in val})
    # A single-file corpus is cut into a training head and a validation tail at a line boundary.
    one = user_corpus(os.path.join(cfg.path, "alpha", "f01.py"))
    (head,), (tail,) = split_documents(one.documents, 0.25)
    assert head.text + tail.text == one.documents[0].text and head.text.endswith("\n")
    assert abs(len(tail.text) / len(one.documents[0].text) - 0.25) < 0.05


def test_sampler_resume_gives_identical_batches(tmp_path):
    ds = prepare_data(small_cfg(tmp_path), 400)
    n_seq = (ds.n_train_tokens - 1) // 32
    steps = n_seq // 5 + 3                       # crosses an epoch boundary at batch size 5
    full = ds.train_sampler(5, seed=7)
    reference = [full.next_batch() for _ in range(steps)]
    first = ds.train_sampler(5, seed=7)
    for _ in range(steps - 4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))   # survives a checkpoint's serialisation
    resumed = ds.train_sampler(5, seed=7)
    resumed.load_state_dict(state)
    for want in reference[-4:]:
        assert torch.equal(resumed.next_batch(), want)
    assert reference[0].shape == (5, 33) and reference[0].dtype == torch.long
    assert full.state_dict()["epoch"] == 1
    # Epoch 0 visits every sequence exactly once.
    starts = collections.Counter()
    tokens = np.asarray(ds.train_tokens, dtype=np.int64)
    seq_of = {tuple(tokens[s * 32:s * 32 + 33]): s for s in range(n_seq)}
    for batch in reference:
        for row in batch.tolist():
            starts[seq_of[tuple(row)]] += 1
    assert [starts[s] for s in range(n_seq)].count(0) == 0
    # Another seed, another order; a mismatched checkpoint is refused.
    assert not torch.equal(ds.train_sampler(5, seed=8).next_batch(), reference[0])
    with pytest.raises(DataError, match="resume with the same data config"):
        ds.train_sampler(5, seed=8).load_state_dict(state)


def test_ranks_split_the_global_batch(tmp_path):
    ds = prepare_data(small_cfg(tmp_path), 400)
    one = ds.train_sampler(6, seed=1)
    ranks = [ds.train_sampler(3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(one.next_batch(), torch.cat([s.next_batch() for s in ranks]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_fim_format_and_rate():
    text = "def add(a, b):\n    return a + b\n"
    n, hits = 4000, 0
    for i in range(n):
        out = apply_fim_text(text, f"doc{i}", 0.3, seed=0)
        if out == text:
            continue
        hits += 1
        assert out.startswith(FIM_BEGIN) and out.count(FIM_HOLE) == 1 and out.count(FIM_END) == 1
        prefix, rest = out[len(FIM_BEGIN):].split(FIM_HOLE)
        suffix, middle = rest.split(FIM_END)
        assert prefix + middle + suffix == text
    assert abs(hits / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert apply_fim_text(text, "doc5", 0.3, seed=0) == apply_fim_text(text, "doc5", 0.3, seed=0)
    assert all(apply_fim_text(text, f"d{i}", 0.0, 0) == text for i in range(100))


def test_fim_tokens_in_packed_documents(tmp_path):
    ds = prepare_data(small_cfg(tmp_path), 400)
    tok = ds.tokenizer
    docs = user_corpus(small_cfg(tmp_path).path).documents[:20]
    encoded = encode_documents(tok, docs, 1.0, seed=3)
    begin, hole, end = tok.fim_ids
    for doc, ids in zip(docs, encoded):
        assert ids[0] == begin and ids[-1] == tok.eos_id and ids.count(hole) == ids.count(end) == 1
        assert tok.decode(ids[:-1]) == apply_fim_text(doc.text, doc.name, 1.0, seed=3)
    fim = prepare_data(small_cfg(tmp_path, fim_rate=0.5), 400)
    n_docs = sum(s["n_documents"] for s in fim.index["shards"].values())
    n_fim = int((np.asarray(fim.train_tokens) == begin).sum() + (np.asarray(fim.val_tokens) == begin).sum())
    assert 0 < n_fim < n_docs and fim.pack_dir != ds.pack_dir


def test_val_batches_and_unigram_entropy(tmp_path):
    ds = prepare_data(small_cfg(tmp_path), 400)
    counts = collections.Counter(ds.val_tokens.tolist())
    total = sum(counts.values())
    reference = -sum(c / total * math.log(c / total) for c in counts.values())
    assert ds.val_unigram_entropy() == pytest.approx(reference, rel=1e-12)
    batches = ds.val_batches(4, 3)
    assert [b.shape for b in batches] == [(4, 33)] * 3
    assert all(torch.equal(a, b) for a, b in zip(batches, ds.val_batches(4, 3)))
    n_val_seq = (ds.n_val_tokens - 1) // 32
    assert sum(len(b) for b in ds.val_batches(4, 10_000)) == n_val_seq
    assert [len(d) for d in ds.val_batch_domains(4, 3)] == [4, 4, 4]


# ------------------------------------------------------------------------------------ bad input
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data.path does not exist: .*nowhere; set data.path"):
        prepare_data(DataConfig(path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)), 512)


def test_empty_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"empty corpus: no .txt/.md/.py/.jsonl files under"):
        prepare_data(DataConfig(path=str(tmp_path / "c"), cache_dir=str(tmp_path)), 512)
    (tmp_path / "c" / "empty.txt").write_text("")
    (tmp_path / "c" / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"empty corpus: the files under .* hold no text"):
        prepare_data(DataConfig(path=str(tmp_path / "c"), cache_dir=str(tmp_path)), 512)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object with a string 'text' field"):
        prepare_data(DataConfig(path=str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path)), 512)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 text"):
        prepare_data(DataConfig(path=str(tmp_path / "latin.txt"), cache_dir=str(tmp_path)), 512)


def test_corpus_too_small_for_seq_len(tmp_path):
    cfg = small_cfg(tmp_path)
    ds = prepare_data(cfg, 400)
    too_long_for_val = (ds.n_val_tokens - 1) + 1          # one sequence needs seq_len + 1 tokens
    with pytest.raises(DataError, match=rf"the validation split has {ds.n_val_tokens} tokens, fewer than one "
                                        rf"sequence of seq_len\+1={too_long_for_val + 1}.*raise data.val_fraction"):
        prepare_data(small_cfg(tmp_path, seq_len=too_long_for_val), 400)
    with pytest.raises(DataError, match=rf"the training split has {ds.n_train_tokens} tokens.*lower data.seq_len"):
        prepare_data(small_cfg(tmp_path, seq_len=ds.n_train_tokens), 400)


def test_linked_folder_followed_once_and_broken_link_refused(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(str(root / "real"))
    os.symlink(root / "real" / "alpha", root / "alias")      # a linked folder is read, like a linked file
    os.symlink(root, root / "real" / "loop")                 # a cycle ends
    files = [f["path"] for f in user_corpus(str(root)).files]
    assert sum(p.startswith("alias/") for p in files) == 12 and not any("loop" in p for p in files)
    assert not any(p.startswith("real/alpha/") for p in files)   # the same real folder once (first by name)
    os.symlink(tmp_path / "gone.txt", root / "real" / "dangling.txt")
    with pytest.raises(DataError, match=r"dangling\.txt is a broken symbolic link .*gone\.txt"):
        user_corpus(str(root))


def test_packed_shards_checked_on_open(tmp_path):
    cfg = small_cfg(tmp_path)
    ds = prepare_data(cfg, 400)
    path = os.path.join(ds.pack_dir, "val.bin")
    data = open(path, "rb").read()
    with open(path, "wb") as f:                                  # same size, one bit changed
        f.write(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match=r"val\.bin does not match the sha256 in its index\); delete that folder"):
        prepare_data(cfg, 400)
    with open(path, "wb") as f:
        f.write(data[:-2])
    with pytest.raises(DataError, match=rf"val\.bin has {len(data) - 2} bytes, its index says {len(data)}"):
        prepare_data(cfg, 400)

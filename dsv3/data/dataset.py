"""Data pipeline: corpus -> tokenizer -> packed memory-mapped token shards -> resumable sampler.

``prepare_data(cfg.data, cfg.model.vocab_size, run_dir)`` returns a ``Dataset``. Documents are joined
with EOS; an optional fill-in-the-middle transform (PSM, report §4.1, rate ``data.fim_rate``) is applied
per document before packing. Packing runs once per (corpus, tokenizer, split, FIM) and is cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional

import numpy as np
import torch

from dsv3.config import DataConfig
from dsv3.data.corpus import Corpus, Document, load_corpus, name_hash, split_documents
from dsv3.errors import DataError
from dsv3.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer, cache_write_error, get_tokenizer

PACK_VERSION = 1
_PACK_CHUNK_CHARS = 1 << 23


# ----------------------------------------------------------------------------------- FIM (PSM)
def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Prefix, middle, suffix cut at two uniform character positions."""
    i, j = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:i], text[i:j], text[j:]


def fim_rng(seed: int, name: str) -> np.random.Generator:
    """Per-document generator: a document's FIM decision does not depend on the others or their order."""
    return np.random.default_rng([seed, name_hash(name)])


def apply_fim_text(text: str, name: str, rate: float, seed: int) -> str:
    """The PSM string ``<|fim_begin|>prefix<|fim_hole|>suffix<|fim_end|>middle`` with probability
    ``rate``, else ``text``. Packing builds the same sequence at the token level."""
    rng = fim_rng(seed, name)
    if rate <= 0 or rng.random() >= rate:
        return text
    prefix, middle, suffix = fim_split(text, rng)
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}{middle}"


def encode_documents(tok: Tokenizer, docs: list[Document], fim_rate: float, seed: int) -> list[list[int]]:
    """Token ids per document, EOS appended; FIM documents are encoded piecewise so the FIM tokens
    are exact ids whatever the tokenizer calls them."""
    texts, plan = [], []
    for doc in docs:
        rng = fim_rng(seed, doc.name)
        if fim_rate > 0 and rng.random() < fim_rate:
            texts.extend(fim_split(doc.text, rng))       # prefix, middle, suffix
            plan.append(3)
        else:
            texts.append(doc.text)
            plan.append(1)
    ids = tok.encode_batch(texts)
    out, k = [], 0
    for n in plan:
        if n == 1:
            out.append(ids[k] + [tok.eos_id])
        else:
            begin, hole, end = tok.fim_ids  # type: ignore[misc]
            prefix, middle, suffix = ids[k:k + 3]
            out.append([begin] + prefix + [hole] + suffix + [end] + middle + [tok.eos_id])
        k += n
    return out


# ------------------------------------------------------------------------------------------ packing
def _chunks(docs: list[Document]):
    start, chars = 0, 0
    for i, doc in enumerate(docs):
        chars += len(doc.text)
        if chars >= _PACK_CHUNK_CHARS:
            yield docs[start:i + 1]
            start, chars = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _pack_split(tok: Tokenizer, docs: list[Document], path: str, dtype, fim_rate: float, seed: int):
    """Write the split's token stream to ``path``; returns (n_tokens, doc start offsets, sha256)."""
    starts, n, digest = [], 0, hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in _chunks(docs):
            for ids in encode_documents(tok, chunk, fim_rate, seed):
                starts.append(n)
                raw = np.asarray(ids, dtype=dtype).tobytes()
                f.write(raw)
                digest.update(raw)
                n += len(ids)
    return n, starts, digest.hexdigest()


def pack(corpus: Corpus, tok: Tokenizer, data_cfg: DataConfig, cache_dir: str, seed: int = 0) -> str:
    """Pack once into ``<cache>/packed/<key>/{train,val}.bin`` + ``index.json``; returns the folder.
    Written to a temp folder and renamed, so a crash leaves nothing half-written."""
    key_src = json.dumps({"v": PACK_VERSION, "corpus": corpus.sha256, "tokenizer": tok.fingerprint,
                          "val_fraction": data_cfg.val_fraction, "fim_rate": data_cfg.fim_rate,
                          "fim_seed": seed}, sort_keys=True)
    out = os.path.join(cache_dir, "packed", hashlib.sha256(key_src.encode()).hexdigest()[:20])
    if os.path.isfile(os.path.join(out, "index.json")):
        return out
    if data_cfg.fim_rate > 0 and tok.fim_ids is None:
        raise DataError(f"data.fim_rate={data_cfg.fim_rate} but tokenizer {tok.source} has no FIM tokens "
                        f"(<|fim_begin|>, <|fim_hole|>, <|fim_end|>); set data.fim_rate=0 or use data.tokenizer=bpe")
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        _pack_into(tmp, out, corpus, tok, data_cfg, seed)
    except OSError as e:
        raise cache_write_error(e, cache_dir) from None
    finally:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pack_into(tmp: str, out: str, corpus: Corpus, tok: Tokenizer, data_cfg: DataConfig, seed: int) -> None:
    train_docs, val_docs = split_documents(corpus.documents, data_cfg.val_fraction)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n_train, _, train_sha = _pack_split(tok, train_docs, os.path.join(tmp, "train.bin"), dtype, data_cfg.fim_rate, seed)
    n_val, val_starts, val_sha = _pack_split(tok, val_docs, os.path.join(tmp, "val.bin"), dtype, data_cfg.fim_rate, seed)
    index = {"version": PACK_VERSION, "dtype": np.dtype(dtype).name, "corpus_sha256": corpus.sha256,
             "tokenizer": tok.describe(), "val_fraction": data_cfg.val_fraction, "fim_rate": data_cfg.fim_rate,
             "fim_seed": seed,
             "shards": {"train": {"file": "train.bin", "n_tokens": n_train, "n_documents": len(train_docs),
                                  "sha256": train_sha},
                        "val": {"file": "val.bin", "n_tokens": n_val, "n_documents": len(val_docs),
                                "sha256": val_sha}},
             "val_documents": [{"name": d.name, "domain": d.domain, "start": s} for d, s in zip(val_docs, val_starts)]}
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    try:
        os.replace(tmp, out)
    except OSError:            # another process (rank) packed the same key first: keep theirs
        if not os.path.isfile(os.path.join(out, "index.json")):
            raise


# ---------------------------------------------------------------------------------------- sampling
def _gather(tokens: np.ndarray, seq_ids: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = [np.asarray(tokens[s * seq_len: s * seq_len + seq_len + 1], dtype=np.int64) for s in seq_ids]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, seq_len + 1, dtype=torch.long)


class Sampler:
    """Sequence s is tokens[s·T : s·T + T + 1] (inputs and shifted labels). Each epoch visits every
    sequence once in a permutation seeded by (seed, epoch). Ranks share the state (epoch, index): a
    step consumes a global batch of batch_size·world_size sequences and rank r keeps its slice."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_sequences = (len(tokens) - 1) // seq_len
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """(B, seq_len+1) int64. ``batch_size`` overrides the per-rank size for this step (batch ramp)."""
        b = self.batch_size if batch_size is None else batch_size
        global_ids = []
        while len(global_ids) < b * self.world_size:
            perm = self._permutation(self.epoch)
            take = min(b * self.world_size - len(global_ids), self.n_sequences - self.index)
            global_ids.extend(perm[self.index:self.index + take])
            self.index += take
            if self.index == self.n_sequences:
                self.epoch, self.index = self.epoch + 1, 0
        mine = np.asarray(global_ids[self.rank * b:(self.rank + 1) * b], dtype=np.int64)
        return _gather(self.tokens, mine, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "seq_len", "n_sequences"):
            if k in state and state[k] != getattr(self, k):
                raise DataError(f"the checkpoint's data sampler has {k}={state[k]}, this run has "
                                f"{getattr(self, k)}; resume with the same data config and train.seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------------------- dataset
def _damaged(pack_dir: str, what: str) -> DataError:
    return DataError(f"the packed data in {pack_dir} is damaged ({what}); delete that folder (a cache: it is "
                     f"packed again from the corpus on the next run)")


_INDEX_FIELDS = {"dtype": str, "fim_rate": (int, float), "val_fraction": (int, float), "shards": dict,
                 "val_documents": list}
_SHARD_FIELDS = {"file": str, "n_tokens": int, "sha256": str}
_DOC_FIELDS = {"name": str, "domain": str, "start": int}


def _has(record, fields: dict) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items())


def _shard_path(pack_dir: str, shard: dict) -> str:
    return os.path.join(pack_dir, os.path.basename(shard["file"]))


def open_index(pack_dir: str) -> dict:
    """``index.json``, each shard's size and sha256 checked against it: a truncated or edited shard
    is refused before it is trained on. Hashing reads every shard once: 0.014 s for the debug
    corpus' 8 MB of tokens, about 1.7 s per GB (0.6 GB/s, one core, measured)."""
    path = os.path.join(pack_dir, "index.json")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as e:
        raise _damaged(pack_dir, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise _damaged(pack_dir, f"{path} is not JSON: {e}") from None
    if not (_has(index, _INDEX_FIELDS) and all(_has(index["shards"].get(k), _SHARD_FIELDS) for k in ("train", "val"))
            and all(_has(d, _DOC_FIELDS) for d in index["val_documents"])):
        raise _damaged(pack_dir, f"{path} lacks fields or has the wrong types")
    try:
        dtype = np.dtype(index["dtype"])
    except TypeError:
        raise _damaged(pack_dir, f"{path} names an unknown dtype {index['dtype']!r}") from None
    for shard in (index["shards"]["train"], index["shards"]["val"]):
        file = _shard_path(pack_dir, shard)
        want = shard["n_tokens"] * dtype.itemsize
        try:
            size = os.path.getsize(file)
            if size != want:
                raise _damaged(pack_dir, f"{file} has {size} bytes, its index says {want}")
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        except OSError as e:
            raise _damaged(pack_dir, f"cannot read {file}: {e.strerror}") from None
        if digest.hexdigest() != shard["sha256"]:
            raise _damaged(pack_dir, f"{file} does not match the sha256 in its index")
    return index


class Dataset:
    def __init__(self, tokenizer: Tokenizer, pack_dir: str, seq_len: int, corpus: Corpus):
        self.tokenizer, self.pack_dir, self.seq_len, self.corpus = tokenizer, pack_dir, seq_len, corpus
        self.index = open_index(pack_dir)
        shards = self.index["shards"]
        self.n_train_tokens = shards["train"]["n_tokens"]
        self.n_val_tokens = shards["val"]["n_tokens"]
        for split, n, fix in (("training", self.n_train_tokens, "add text to the corpus"),
                              ("validation", self.n_val_tokens, "raise data.val_fraction or add text to the corpus")):
            if n < seq_len + 1:
                raise DataError(f"corpus too small for data.seq_len={seq_len}: the {split} split has {n} tokens, "
                                f"fewer than one sequence of seq_len+1={seq_len + 1}; lower data.seq_len or {fix}")
        dtype = np.dtype(self.index["dtype"])
        self.train_tokens = np.memmap(_shard_path(pack_dir, shards["train"]), dtype=dtype, mode="r")
        self.val_tokens = np.memmap(_shard_path(pack_dir, shards["val"]), dtype=dtype, mode="r")
        self.n_val_sequences = (self.n_val_tokens - 1) // seq_len
        docs = self.index["val_documents"]
        starts = np.asarray([d["start"] for d in docs], dtype=np.int64)
        mid = np.arange(self.n_val_sequences, dtype=np.int64) * seq_len + seq_len // 2
        # Domain of a validation sequence: the document under its middle token.
        self.val_domains: list[str] = [docs[i]["domain"] for i in np.searchsorted(starts, mid, side="right") - 1]
        self.domains: list[str] = sorted({d["domain"] for d in docs})

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Sampler:
        return Sampler(self.train_tokens, self.seq_len, batch_size, seed, rank, world_size)

    def _val_ids(self, batch_size: int, n_batches: int) -> np.ndarray:
        """A fixed set, spread evenly over the validation stream (so every domain is visited)."""
        m = min(self.n_val_sequences, batch_size * n_batches)
        return (np.arange(m, dtype=np.int64) * self.n_val_sequences) // m

    def val_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        """Up to n_batches of (≤B, seq_len+1); fewer if the split holds fewer sequences."""
        ids = self._val_ids(batch_size, n_batches)
        return [_gather(self.val_tokens, ids[i:i + batch_size], self.seq_len) for i in range(0, len(ids), batch_size)]

    def val_batch_domains(self, batch_size: int, n_batches: int) -> list[list[str]]:
        """Domain tags aligned with ``val_batches(batch_size, n_batches)``."""
        ids = self._val_ids(batch_size, n_batches)
        return [[self.val_domains[s] for s in ids[i:i + batch_size]] for i in range(0, len(ids), batch_size)]

    def val_unigram_entropy(self) -> float:
        """H = −Σ p log p (nats/token) over the validation split's token frequencies: the loss of a
        model that knows only unigram statistics, a reference line for the validation loss."""
        counts = np.bincount(np.asarray(self.val_tokens), minlength=1).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def describe(self) -> dict:
        return {"corpus": self.corpus.source, "corpus_sha256": self.corpus.sha256,
                "tokenizer": self.tokenizer.describe(), "pack_dir": self.pack_dir,
                "n_train_tokens": self.n_train_tokens, "n_val_tokens": self.n_val_tokens,
                "val_documents": len(self.index["val_documents"]), "domains": self.domains,
                "shards": self.index["shards"], "fim_rate": self.index["fim_rate"]}

    def write_manifest(self, run_dir: str) -> str:
        """``<run_dir>/corpus.json``: every file with its sha256, the tokenizer and the packed shards.
        The tokenizer file is copied to ``<run_dir>/tokenizer/`` (``tokenizer.json`` or
        ``tokenizer.model``), and ``corpus.json``'s ``tokenizer.file`` names it relative to the run
        folder with its ``file_sha256``, so the run folder alone serves ``dsv3.tools.generate`` and
        ``dsv3.checkpoint.hf export`` (``source`` keeps the path it was read from, for the record)."""
        path = os.path.join(run_dir, "corpus.json")
        tok_rel = os.path.join(TOKENIZER_DIR, self.tokenizer.file_name)
        try:
            os.makedirs(run_dir, exist_ok=True)
            tok_sha = _copy_atomic(self.tokenizer.source, os.path.join(run_dir, tok_rel))
        except OSError as e:
            raise DataError(f"cannot copy the tokenizer {self.tokenizer.source} into {run_dir} ({e.strerror}); make "
                            f"train.out_dir writable or set it to a writable folder") from None
        manifest = {**self.corpus.manifest(),
                    "tokenizer": {**self.tokenizer.describe(), "file": tok_rel, "file_sha256": tok_sha},
                    "n_train_tokens": self.n_train_tokens, "n_val_tokens": self.n_val_tokens,
                    "shards": self.index["shards"], "fim_rate": self.index["fim_rate"],
                    "val_fraction": self.index["val_fraction"],
                    "val_documents": [{"name": d["name"], "domain": d["domain"]} for d in self.index["val_documents"]]}
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            raise DataError(f"cannot write {path} ({e.strerror}); make train.out_dir writable or set it to a "
                            f"writable folder") from None
        return path


TOKENIZER_DIR = "tokenizer"   # <run_dir>/tokenizer/tokenizer.{json,model}, named by corpus.json


def _copy_atomic(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` through a temporary file renamed into place; returns the sha256 of the
    bytes written (read once, so the hash is of exactly what was copied)."""
    with open(src, "rb") as f:
        data = f.read()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return hashlib.sha256(data).hexdigest()


def prepare_data(data_cfg: DataConfig, vocab_size: int, run_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """Load the corpus, train or load the tokenizer (cached), pack (cached), write corpus.json into
    run_dir. ``seed`` seeds FIM only; the sampler takes its own seed."""
    if data_cfg.seq_len < 1:
        raise DataError(f"data.seq_len must be >= 1, got {data_cfg.seq_len}")
    if not 0.0 <= data_cfg.fim_rate <= 1.0:
        raise DataError(f"data.fim_rate must be in [0, 1], got {data_cfg.fim_rate}")
    corpus = load_corpus(data_cfg.path, data_cfg.domain_field)
    cache_dir = os.path.abspath(os.path.expanduser(data_cfg.cache_dir))
    train_docs, _ = split_documents(corpus.documents, data_cfg.val_fraction)
    # The tokenizer sees training documents only, so its cache key includes the split.
    split_key = hashlib.sha256(f"{corpus.sha256}:{data_cfg.val_fraction!r}".encode()).hexdigest()
    tok = get_tokenizer(data_cfg.tokenizer, vocab_size, train_docs, split_key, cache_dir,
                        data_cfg.tokenizer_sample_mb)
    dataset = Dataset(tok, pack(corpus, tok, data_cfg, cache_dir, seed), data_cfg.seq_len, corpus)
    if run_dir is not None:
        dataset.write_manifest(run_dir)
    return dataset

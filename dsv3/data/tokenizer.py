"""Tokenizers: trained byte-level BPE (as DeepSeek-V3's 128K tokenizer, report §4.1), trained
SentencePiece (identity normalisation, byte fallback), or a given SentencePiece ``.model`` /
Hugging Face ``tokenizer.json``.

Both trained kinds are lossless: ``decode(encode(x)) == x`` byte for byte, whitespace included.
EOS and the three FIM tokens are always reserved, so token ids do not depend on ``data.fim_rate``.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator, Optional

from dsv3.data.corpus import Document, name_hash
from dsv3.errors import DataError

EOS = "<|eos|>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"
SPECIAL_TOKENS = [EOS, FIM_BEGIN, FIM_HOLE, FIM_END]

# Names the same tokens carry in published tokenizers (DeepSeek-V3 uses fullwidth bars and ▁).
EOS_ALIASES = [EOS, "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"]
FIM_ALIASES = [(FIM_BEGIN, FIM_HOLE, FIM_END),
               ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
               ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]  # PSM order: prefix, hole, middle
TRAINED_KINDS = ("bpe", "sentencepiece")
SP_META = "\u2581"
_ENCODE_CHUNK_CHARS = 1 << 21   # bound the memory held in tokenizers' Encoding objects


class Tokenizer:
    """One interface over a ``tokenizers.Tokenizer`` or a ``SentencePieceProcessor``."""

    def __init__(self, backend, kind: str, source: str):
        self.backend, self.kind, self.source = backend, kind, source
        self._is_sp = kind in ("sentencepiece", "sentencepiece-file")
        if self._is_sp:
            self.vocab_size = backend.get_piece_size()
            serialized = backend.serialized_model_proto()
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            serialized = backend.to_str().encode()
        self.fingerprint = hashlib.sha256(serialized).hexdigest()
        self.eos_id = self._find([[a] for a in EOS_ALIASES])
        if self.eos_id is None:
            raise DataError(f"tokenizer {source} has no end-of-document token (tried {', '.join(EOS_ALIASES)}); "
                            f"use a tokenizer that has one, or data.tokenizer=bpe")
        self.eos_id = self.eos_id[0]
        self.fim_ids: Optional[tuple[int, int, int]] = self._find(FIM_ALIASES)
        # SentencePiece reads U+2581 "▁" as its space marker; with byte fallback we spell a literal
        # one as its three UTF-8 byte pieces, which decode back to "▁", so it round-trips.
        self._sp_meta_ids: Optional[list[int]] = None
        if self._is_sp:
            ids = [self._token_id(f"<0x{b:02X}>") for b in SP_META.encode()]
            self._sp_meta_ids = None if None in ids else ids  # type: ignore[assignment]

    def _token_id(self, token: str) -> Optional[int]:
        if self._is_sp:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def _find(self, alias_groups) -> Optional[tuple]:
        for group in alias_groups:
            ids = tuple(self._token_id(t) for t in group)
            if all(i is not None for i in ids):
                return ids
        return None

    def _sp_encode(self, texts: list[str]) -> list[list[int]]:
        out = self.backend.encode(texts, num_threads=os.cpu_count() or 1)
        if self._sp_meta_ids is not None:
            for k, text in enumerate(texts):
                if SP_META in text:
                    parts = self.backend.encode(text.split(SP_META))
                    out[k] = parts[0] + [i for part in parts[1:] for i in self._sp_meta_ids + part]
        return out

    def encode(self, text: str) -> list[int]:
        if self._is_sp:
            return self._sp_encode([text])[0]
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Multi-threaded; processed in chunks so a 30 MB corpus does not hold every Encoding at once."""
        out: list[list[int]] = []
        start = 0
        while start < len(texts):
            end, chars = start, 0
            while end < len(texts) and (end == start or chars + len(texts[end]) <= _ENCODE_CHUNK_CHARS):
                chars += len(texts[end])
                end += 1
            chunk = texts[start:end]
            if self._is_sp:
                out.extend(self._sp_encode(chunk))
            else:
                encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
                out.extend(e.ids for e in encode(chunk, add_special_tokens=False))
            start = end
        return out

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._is_sp:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        if self._is_sp:
            return [self.decode(ids) for ids in batch]
        return self.backend.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=False)

    @property
    def file_name(self) -> str:
        """The conventional name of this tokenizer's file (as Hugging Face folders hold it)."""
        return "tokenizer.model" if self._is_sp else "tokenizer.json"

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "fim_ids": list(self.fim_ids) if self.fim_ids else None,
                "sha256": self.fingerprint}


# ------------------------------------------------------------------------------------------ training
def tokenizer_sample(docs: list[Document], sample_mb: float) -> list[str]:
    """A deterministic sample of about sample_mb MB: whole documents in name-hash order (spread over
    domains, independent of file order), the last one cut to fit."""
    budget = int(sample_mb * 1e6)
    if budget <= 0:
        raise DataError(f"data.tokenizer_sample_mb must be > 0, got {sample_mb}")
    out, used = [], 0
    for doc in sorted(docs, key=lambda d: (name_hash(d.name), d.name)):
        take = doc.text[: budget - used]
        out.append(take)
        used += len(take)
        if used >= budget:
            break
    return out


def train_bpe(texts: list[str], vocab_size: int):
    """Byte-level BPE: digits split in runs of at most 3 (as DeepSeek-V3's pre-tokenizer), then the
    GPT-2 byte-level regex; no normaliser, so every byte string round-trips."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    min_size = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < min_size:
        raise DataError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE tokenizer "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); raise it to at least {min_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _sp_sentences(texts: list[str], max_chars: int) -> Iterator[str]:
    """Documents cut at line boundaries into pieces SentencePiece accepts (it drops longer ones)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + max_chars)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield text[start:end]
            start = end


def train_sentencepiece(texts: list[str], vocab_size: int):
    """SentencePiece BPE with identity normalisation, no dummy prefix, whitespace kept and byte
    fallback, so any UTF-8 string round-trips. EOS and FIM are user-defined symbols so they decode
    back to their text like the BPE kind's special tokens."""
    import sentencepiece as spm
    min_size = 256 + len(SPECIAL_TOKENS) + 2
    if vocab_size < min_size:
        raise DataError(f"model.vocab_size={vocab_size} is too small for a byte-fallback SentencePiece "
                        f"tokenizer; raise it to at least {min_size}")
    model = io.BytesIO()
    max_chars = 4096
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sp_sentences(texts, max_chars), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, character_coverage=0.9995, max_sentence_length=4 * max_chars,
            user_defined_symbols=SPECIAL_TOKENS, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            hard_vocab_limit=False, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed ({e}); change model.vocab_size or "
                        f"data.tokenizer_sample_mb") from None
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.getvalue())
    return sp


# ------------------------------------------------------------------------------------ load or train
def cache_write_error(e: OSError, cache_dir: str) -> DataError:
    """A read-only, full or misplaced data.cache_dir as one line naming the folder and the fix."""
    return DataError(f"cannot write to data.cache_dir {cache_dir} ({e.strerror}: {e.filename}); make it writable, "
                     f"free space, or set data.cache_dir to a writable folder")


def load_tokenizer_file(path: str) -> Tokenizer:
    if path.endswith(".model"):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer {path} is not a SentencePiece model ({e})") from None
        return Tokenizer(sp, "sentencepiece-file", path)
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"data.tokenizer {path} is not a Hugging Face tokenizer.json ({e})") from None
    return Tokenizer(tok, "tokenizer.json", path)


def get_tokenizer(spec: str, vocab_size: int, docs: list[Document], docs_key: str,
                  cache_dir: str, sample_mb: float) -> Tokenizer:
    """``spec`` is data.tokenizer: "bpe" / "sentencepiece" (trained on a sample of ``docs``, cached in
    cache_dir keyed by ``docs_key`` (a hash of the documents), vocab size, kind and sample size) or a
    tokenizer file path."""
    if spec in TRAINED_KINDS:
        ext = "json" if spec == "bpe" else "model"
        path = os.path.join(cache_dir, "tokenizers", f"{spec}-v{vocab_size}-s{sample_mb:g}mb-{docs_key[:16]}.{ext}")
        if not os.path.isfile(path):
            texts = tokenizer_sample(docs, sample_mb)
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, "wb") as f:   # opened before training: an unwritable cache fails at once
                    if spec == "bpe":
                        f.write(train_bpe(texts, vocab_size).to_str(pretty=True).encode())
                    else:
                        f.write(train_sentencepiece(texts, vocab_size).serialized_model_proto())
                os.replace(tmp, path)
            except OSError as e:
                raise cache_write_error(e, cache_dir) from None
            finally:   # no half-written file, also when training itself fails
                if os.path.exists(tmp):
                    os.remove(tmp)
        try:
            tok = load_tokenizer_file(path)
        except DataError:
            raise DataError(f"the cached tokenizer {path} is damaged; delete it (it is retrained from the "
                            f"corpus on the next run)") from None
        tok.kind = spec
        return tok
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer '{spec}': expected 'bpe', 'sentencepiece', or the path of a "
                        f"SentencePiece .model or a tokenizer.json file (no such file: {path})")
    tok = load_tokenizer_file(path)
    if tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} tokens, more than model.vocab_size={vocab_size}; "
                        f"raise model.vocab_size to at least {tok.vocab_size}")
    return tok

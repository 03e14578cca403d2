"""Corpus discovery: the embedded default corpus (this interpreter's standard-library ``.py`` sources)
or a user corpus (``data.path``: a file or folder of ``.txt/.md/.py/.jsonl``).

A document is one file or one jsonl record; its ``name`` is stable (relative path, ``path#line`` for
jsonl records) and decides the validation split, so the split does not move when files are added
elsewhere. Every document carries a domain tag for per-domain validation loss.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Optional

from dsv3.errors import DataError

ACCEPTED_EXTENSIONS = (".txt", ".md", ".py", ".jsonl")
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str      # stable id: path relative to the corpus root, "file.jsonl#12" for a jsonl record
    text: str
    domain: str    # stdlib: top-level package ("email", "asyncio") or module name; user: see load_corpus


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    source: str                     # "embedded:<stdlib path>" or the absolute user path
    files: list[dict]               # [{"path", "bytes", "sha256"}] in read order
    sha256: str                     # hash over the file list and contents: the cache key

    def manifest(self) -> dict:
        """What a run trained on, written to ``<run_dir>/corpus.json``."""
        return {"source": self.source, "sha256": self.sha256, "n_files": len(self.files),
                "n_documents": len(self.documents), "bytes": sum(f["bytes"] for f in self.files),
                "files": self.files}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk_sorted(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Files under root with one of the extensions, test folders skipped, sorted by relative path.
    Linked folders are followed (as linked files are read), each real folder once, so a cycle ends."""
    found, seen = [], {os.path.realpath(root)}
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [x for x in dirs if x not in SKIPPED_DIRS and not x.startswith(".")]
        real = [os.path.realpath(os.path.join(d, x)) for x in dirs]
        dirs[:] = [x for x, r in zip(dirs, real) if r not in seen]
        seen.update(real)
        found.extend(os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(extensions))
    return sorted(p.replace(os.sep, "/") for p in found)


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 "
                        f"or remove it from data.path") from None


def _top_level(rel: str) -> str:
    """'email/mime/text.py' -> 'email'; 'json.py' -> 'json' (a single module is its own domain)."""
    head = rel.split("/", 1)[0]
    return head if "/" in rel else os.path.splitext(head)[0]


def _read_files(root: str, rels: list[str]) -> tuple[list[tuple[str, str]], list[dict], str]:
    texts, files, total = [], [], hashlib.sha256()
    for rel in rels:
        path = os.path.join(root, rel)
        if os.path.islink(path) and not os.path.exists(path):
            raise DataError(f"{path} is a broken symbolic link (to {os.readlink(path)}); fix its target or remove "
                            f"it from data.path (training on less data than given is not done silently)")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"cannot read data file {path} ({e.strerror}); make it readable or remove it "
                            f"from data.path") from None
        digest = hashlib.sha256(raw).hexdigest()
        files.append({"path": rel, "bytes": len(raw), "sha256": digest})
        total.update(f"{rel}\0{digest}\n".encode())
        texts.append((rel, _decode(raw, path)))
    return texts, files, total.hexdigest()


def embedded_corpus() -> Corpus:
    """The running interpreter's standard library, without test folders, in sorted path order."""
    root = stdlib_root()
    rels = _walk_sorted(root, (".py",))
    texts, files, digest = _read_files(root, rels)
    docs = [Document(rel, text, _top_level(rel)) for rel, text in texts if text]
    if not docs:
        raise DataError(f"the embedded corpus is empty: no .py files under {root}; set data.path to a corpus")
    return Corpus(docs, f"embedded:{root}", files, digest)


def _jsonl_documents(rel: str, text: str, path: str, domain_field: Optional[str],
                     default_domain: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl "
                            f"corpus must be an object with a 'text' field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        domain = default_domain
        if domain_field is not None:
            if domain_field not in record:
                raise DataError(f"{path}:{lineno}: no field '{domain_field}' (data.domain_field); "
                                f"add it to every record or unset data.domain_field")
            domain = str(record[domain_field])
        if record["text"]:
            docs.append(Document(f"{rel}#{lineno}", record["text"], domain))
    return docs


def user_corpus(path: str, domain_field: Optional[str] = None) -> Corpus:
    """A file or folder of .txt/.md/.py/.jsonl. Domain: the jsonl record's ``domain_field`` if set,
    else the top-level folder under the corpus root (a top-level file is its own domain)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"data.path does not exist: {path}; set data.path to a file or folder of "
                        f"{'/'.join(ACCEPTED_EXTENSIONS)} files, or unset it for the embedded corpus")
    if os.path.isfile(path):
        if not path.endswith(ACCEPTED_EXTENSIONS):
            raise DataError(f"data.path {path} is not a {'/'.join(ACCEPTED_EXTENSIONS)} file")
        root, rels = os.path.dirname(path), [os.path.basename(path)]
    else:
        root, rels = path, _walk_sorted(path, ACCEPTED_EXTENSIONS)
    if not rels:
        raise DataError(f"empty corpus: no {'/'.join(ACCEPTED_EXTENSIONS)} files under {path}; "
                        f"point data.path at a folder that holds some")
    texts, files, digest = _read_files(root, rels)
    docs: list[Document] = []
    for rel, text in texts:
        domain = _top_level(rel)
        if rel.endswith(".jsonl"):
            docs.extend(_jsonl_documents(rel, text, os.path.join(root, rel), domain_field, domain))
        elif text:
            docs.append(Document(rel, text, domain))
    if not docs:
        raise DataError(f"empty corpus: the files under {path} hold no text; add text to them or "
                        f"point data.path elsewhere")
    return Corpus(docs, path, files, digest)


def load_corpus(path: Optional[str], domain_field: Optional[str] = None) -> Corpus:
    return embedded_corpus() if path is None else user_corpus(path, domain_field)


def name_hash(name: str) -> int:
    """A stable 64-bit hash of a document name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Held-out split: the round(val_fraction·n) documents (at least 1) with the smallest name hash.
    Chosen by name, so it is the same on every machine and run. Both lists keep corpus order.

    A corpus of one document (a single .txt) is cut at the line boundary nearest (1 − val_fraction)
    of its length, so it still has a validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        doc = docs[0]
        cut = doc.text.rfind("\n", 0, int(len(doc.text) * (1 - val_fraction))) + 1
        if cut <= 0 or cut >= len(doc.text):
            cut = int(len(doc.text) * (1 - val_fraction))
        return ([Document(doc.name + "[train]", doc.text[:cut], doc.domain)],
                [Document(doc.name + "[val]", doc.text[cut:], doc.domain)])
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(range(len(docs)), key=lambda i: (name_hash(docs[i].name), docs[i].name))
    val_ids = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val

"""Generation with the compressed MLA cache: greedy equals transformers' generate and our own uncached
decoding; top-p draws follow the renormalised nucleus; the CLI from a run folder and its HF export."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from dsv3.checkpoint.store import save_checkpoint
from dsv3.config import Config, DataConfig, to_dict
from dsv3.model.sampling import generate, sample_next
from dsv3.tools.generate import main as generate_main
from dsv3.checkpoint.hf import load_hf_checkpoint, main as hf_main
from dsv3.model.transformer import Transformer
from test_hf import hf_v3, ours_cfg, randomize

PROMPT = [5, 17, 3, 60, 42]


def test_greedy_matches_transformers_generate(tmp_path):
    hf = hf_v3()
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(str(tmp_path))
    ids = generate(ours, None, PROMPT, max_new_tokens=16)
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    assert ids == out[0, len(PROMPT):].tolist()


def test_cached_decoding_matches_full_recompute():
    model = Transformer(dataclasses.replace(ours_cfg(v3=True, mtp=0), max_seq_len=24)).eval()
    randomize(model)
    ids = generate(model, None, PROMPT, max_new_tokens=12)
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert ids == seq[len(PROMPT):]
    # sampling: a fixed seed gives one sequence, and max_seq_len bounds the length
    a = generate(model, None, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a == generate(model, None, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7) and len(a) == 12
    assert len(generate(model, None, PROMPT, 1000)) == 24 - len(PROMPT)


def test_top_p_draws_follow_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    # top_p = 0.8: the smallest prefix of the sorted probabilities with mass >= 0.8
    mass = torch.cumsum(probs[order], 0)
    n_keep = int((mass < 0.8).sum()) + 1
    nucleus = torch.zeros_like(probs)
    nucleus[order[:n_keep]] = probs[order[:n_keep]]
    nucleus /= nucleus.sum()
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample_next(logits, 1.0, 0.8, gen) for _ in range(n)]), minlength=6)
    assert (counts[nucleus == 0] == 0).all() and n_keep == 3
    assert (counts / n - nucleus).abs().max() < 0.012
    assert sample_next(logits, 0.0) == 0 and sample_next(logits, 1.0, 1e-6, gen) == 0


@pytest.fixture
def run_dir(tmp_path):
    """A training run folder as the trainer leaves it: config.yaml, two checkpoints, a tokenizer."""
    from dsv3.data.tokenizer import train_bpe
    run = tmp_path / "run"
    model_cfg = dataclasses.replace(ours_cfg(v3=True, mtp=1), vocab_size=300)
    run.mkdir()
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump(to_dict(Config(model=model_cfg, data=DataConfig(seq_len=32))), f)
    for step in (1, 2):  # written as the trainer writes them (manifest, optimizer, rng)
        model = Transformer(model_cfg)
        randomize(model)
        save_checkpoint(str(run), step, model, torch.optim.SGD(model.parameters(), lr=0.0),
                        {"tokens": 0, "sampler": {}})
    train_bpe(["hello world, the quick brown fox " * 40], 300).save(str(run / "tokenizer.json"))
    return run, model  # model: the latest checkpoint's weights


def test_generate_cli_from_run_folder_and_its_export(run_dir, tmp_path, capsys):
    run, model = run_dir
    from dsv3.checkpoint.hf import load_tokenizer
    tok = load_tokenizer(str(run / "tokenizer.json"))
    prompt = tok.encode("hello world")
    # greedy by full recomputation (no cache), stopping after the tokenizer's end-of-text id
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model.eval()(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == tok.eos_id:
                break
    expected = tok.decode(seq)
    assert generate_main(["--checkpoint", str(run), "--prompt", "hello world", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    out = tmp_path / "hf"
    assert hf_main(["export", str(run), str(out), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == prompt
    assert hf_tok.eos_token_id == tok.eos_id == json.load(open(out / "config.json"))["eos_token_id"]
    assert generate_main(["--checkpoint", str(out), "--prompt", "hello world", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert generate_main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err

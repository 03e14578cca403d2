"""The config reference (dsv3/config_doc.py, docs/config.md) and `--help` on every entry point.

The reference must cover every key of the dataclass tree with a description, its printed defaults must
load back to the real defaults, docs/config.md must be current, and each argparse entry point must give
every flag a help text."""
import argparse
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from dsv3 import config as config_mod
from dsv3 import config_doc
from dsv3.tools import show_config
from dsv3.config import Config, load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_key_has_a_description_and_no_description_is_stale():
    """The keys are the leaves of the default config as a dict, plus the fields of the sections that are
    absent by default (rope_scaling, batch_ramp: null; lr_segments: an empty list)."""
    from dsv3.config import BatchRamp, LRSegment, RopeScaling
    want = set(_leaves(to_dict(Config())))
    for prefix, cls in (("model.mla.rope_scaling.", RopeScaling), ("train.batch_ramp.", BatchRamp),
                        ("train.lr_segments[].", LRSegment)):
        want |= {prefix + f.name for f in dataclasses.fields(cls)}
    paths = [k.path for k in config_doc.keys()]
    assert sorted(paths) == sorted(want)
    missing = config_doc.undocumented()
    assert not missing, f"add a one-line meaning to dsv3/config_doc.py DOC for: {', '.join(missing)}"
    assert set(config_doc.DOC) <= want, f"DOC describes keys that no longer exist: {set(config_doc.DOC) - want}"
    assert set(config_doc.SYMBOL) <= want


def test_printed_defaults_load_back_to_the_defaults():
    """Every default as the reference prints it, given back as an override, is the dataclass's default."""
    ks = [k for k in config_doc.keys() if not k.path.startswith(("model.mla.rope_scaling.", "train.batch_ramp.",
                                                                  "train.lr_segments[]"))]
    cfg = load_config(None, [f"{k.path}={k.default}" for k in ks])
    assert cfg == Config()
    by = {k.path: k for k in config_doc.keys()}
    assert by["model.moe.n_activated_experts"][1:4] == ("int", "4", "K_r")
    assert by["model.moe.bias_update_speed"][1:4] == ("float", "0.001", "γ")
    assert by["train.lr_segments[].kind"][1:3] == ("constant | cosine | step", "constant")
    assert by["train.sample_prompt"].default == "'def '"     # trailing space kept visible


def test_docs_config_md_is_current():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == config_doc.markdown(), "docs/config.md is stale: python -m dsv3.config_doc > docs/config.md"


def test_config_help_and_describe(capsys):
    proc = subprocess.run([sys.executable, "-m", "dsv3.tools.show_config", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m dsv3.tools.show_config")
    assert all(f"  {k.path} " in proc.stdout for k in config_doc.keys())

    assert show_config.main(["--describe", "model.moe.n_activated_experts"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["model.moe.n_activated_experts", "  type:    int", "  default: 4",
                       "  symbol:  K_r (DeepSeek-V3 report)"]
    assert out[4].strip() == config_doc.DOC["model.moe.n_activated_experts"]

    assert show_config.main(["--describe", "model.moe.topk"]) == 2    # a guess: one line naming the real key
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config key 'model.moe.topk'" in err[0] and "model.moe.n_activated_experts" in err[0]

    assert show_config.main(["--describe", "model.mtp"]) == 0          # a section: each of its keys, one a line
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == [f"model.mtp.{f.name}" for f in dataclasses.fields(config_mod.MTPConfig)]

    assert show_config.main([]) == 2                                   # no config: usage, exit 2 as before
    assert "usage: python -m dsv3.tools.show_config" in capsys.readouterr().err
    assert show_config.main(["configs/debug.yaml", "--help"]) == 0     # --help after the config too
    assert capsys.readouterr().out.startswith("usage: python -m dsv3.tools.show_config")


def test_train_help(capsys):
    from dsv3.train import main
    for argv in (["--help"], ["-h"], ["configs/debug.yaml", "train.steps=3", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m dsv3.train [CONFIG.yaml] [key.path=value ...]")
        assert "Exit codes:" in out and "python -m dsv3.tools.show_config --help" in out
        assert all(k in out for k in config_doc.TRAIN_KEYS)


def _parsers(monkeypatch, module: str, argv: list[str]) -> list[argparse.ArgumentParser]:
    """Runs module.main(argv + ['--help']), returns the parsers it built, subcommands' included."""
    seen: list[argparse.ArgumentParser] = []
    orig = argparse.ArgumentParser.parse_args

    def record(self, *a, **kw):
        seen.append(self)
        return orig(self, *a, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    for p in list(seen):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                seen += list(a.choices.values())
    return seen


ENTRY_POINTS = {  # module, argv before --help, flags its help must document
    "dsv3.checkpoint.hf": ([], ["convert", "export"]),
    "dsv3.checkpoint.hf convert": (["convert"], ["--to-bf16", "--to-fp8", "--max-shard-size", "--overwrite", "src", "dst"]),
    "dsv3.checkpoint.hf export": (["export"], ["--fp8", "--dtype", "--max-shard-size", "--overwrite", "run_dir", "out_dir"]),
    "dsv3.tools.generate": ([], ["--checkpoint", "--prompt", "--prompt-ids", "--tokenizer", "--max-new-tokens",
                           "--temperature", "--top-p", "--seed", "--dtype", "--device"]),
    "dsv3.tools.ablate": ([], ["--config", "--steps", "--seeds", "--out", "--variants", "--matrix", "--baseline",
                         "--keep-checkpoints", "--report", "overrides"]),
    "parallel.simulate": ([], ["--kind", "--ranks", "--chunks", "--F", "--B", "--Bi", "--W", "--p2p", "--FB",
                               "--unit", "--png", "--text"]),
    "dsv3.tools.plots": ([], ["run_dir", "--out"]),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_flag_has_help(monkeypatch, capsys, name):
    argv, flags = ENTRY_POINTS[name]
    parsers = _parsers(monkeypatch, name.split()[0], argv)
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    undocumented = [(p.prog, a.dest) for p in parsers for a in p._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not undocumented, f"flags without help: {undocumented}"
    assert all(f in out for f in flags), [f for f in flags if f not in out]


def test_plan_help_documents_the_layout_flags(monkeypatch, capsys):
    parsers = _parsers(monkeypatch, "dsv3.tools.plan", [])
    out = capsys.readouterr().out
    helps = {s: a.help for a in parsers[0]._actions for s in a.option_strings}
    for flag in ("--pp", "--ep", "--dp"):
        assert flag in out and (helps[flag] or "").strip()

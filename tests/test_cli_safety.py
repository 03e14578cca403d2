"""The CLIs lose nothing and print one line: ``dsv3.checkpoint.hf export/convert`` never write into or around their
input, never replace a folder they did not write (the ``.dsv3-export`` marker) and replace their own only
with --overwrite, atomically; ``convert`` refuses a foreign or incomplete checkpoint before writing;
``dsv3.tools.generate``, ``dsv3.tools.plan`` and ``launch/run.sh`` reject bad flags with one ``error:`` line and exit 2;
Ctrl-C is one ``interrupted`` line, exit 130, and no half-written output."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.tools import generate as generate_mod, plan as plan_mod

from dsv3 import train as train_mod
from dsv3.config import load_config
from dsv3.checkpoint.hf import main as hf_main
from dsv3.checkpoint.hf_shards import MARKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
MAINS = {"hf": hf_main, "generate": generate_mod.main, "plan": plan_mod.main}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-step training run, its export (a marked folder), a folder of someone else's files, a llama
    checkpoint and an export with one tensor removed. Paths by name; {name} in argv is replaced by them."""
    base = tmp_path_factory.mktemp("cli")
    run = str(base / "run")
    assert train_mod.main([DEBUG, "train.steps=1", "train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32",
                           "train.sample_tokens=2", "train.eval_batches=1", f"data.cache_dir={CACHE}",
                           f"train.out_dir={run}"]) == 0
    w = {"run": run, "base": str(base), "export": str(base / "export"), "mine": str(base / "mine"),
         "file": str(base / "a_file"), "llama": str(base / "llama"), "holey": str(base / "holey"),
         "link": str(base / "link_to_run"), "new": str(base / "new")}
    assert hf_main(["export", run, w["export"], "--dtype", "fp32", "--max-shard-size", "200KB"]) == 0
    os.makedirs(w["mine"])
    for name in ("notes.txt", "model.safetensors"):
        with open(os.path.join(w["mine"], name), "w") as f:
            f.write(f"someone's {name}\n")
    open(w["file"], "w").write("a file\n")
    os.symlink(run, w["link"])
    os.makedirs(w["llama"])
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8},
              open(os.path.join(w["llama"], "config.json"), "w"))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 8)}, os.path.join(w["llama"], "model.safetensors"))
    assert hf_main(["export", run, w["holey"], "--dtype", "fp32"]) == 0
    tensors = load_file(os.path.join(w["holey"], "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, os.path.join(w["holey"], "model.safetensors"), metadata={"format": "pt"})
    w["max_seq_len"] = load_config(os.path.join(run, "config.yaml")).model.max_seq_len
    return w


def snapshot(folder: str) -> dict:
    """Every file under ``folder`` (links not followed) -> sha256 of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def one_error_line(code: int, err: str, needle: str, want_code: int = 2) -> str:
    assert code == want_code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    return lines[0]


LONG_IDS = "{long_ids}"
BAD_INPUT = [
    # dsv3.checkpoint.hf export / convert: outputs that overlap the input or hold other files
    ("hf", ["export", "{run}", "{run}"], "is the input folder itself"),
    ("hf", ["export", "{link}", "{run}"], "is the input folder itself"),  # symlinks resolved
    ("hf", ["export", "{run}", "{run}/hf"], "inside the input folder"),
    ("hf", ["export", "{run}", "{base}"], "contains the input"),
    ("hf", ["export", "{run}", "{link}"], "symbolic link"),
    ("hf", ["export", "{run}", "{mine}"], "was not written by dsv3"),
    ("hf", ["export", "{run}", "{mine}", "--overwrite"], "was not written by dsv3"),
    ("hf", ["export", "{run}", "{export}"], "pass --overwrite"),
    ("hf", ["export", "{run}", "{file}"], "is not a folder"),
    ("hf", ["export", "{base}/nowhere", "{new}"], "nowhere"),
    ("hf", ["export", "{run}", "{new}", "--max-shard-size", "lots"], "--max-shard-size"),
    ("hf", ["export", "{run}"], "required"),
    ("hf", ["frobnicate"], "invalid choice"),
    ("hf", ["convert", "{export}", "{export}", "--overwrite"], "is the input folder itself"),
    ("hf", ["convert", "{export}", "{mine}"], "was not written by dsv3"),
    ("hf", ["convert", "{llama}", "{new}"], "LlamaForCausalLM"),
    ("hf", ["convert", "{holey}", "{new}"], "'model.layers.1.self_attn.o_proj.weight' is missing (1 missing in all)"),
    ("hf", ["convert", "{run}", "{new}"], "config.json is missing"),
    # dsv3.tools.generate
    ("generate", ["--checkpoint", "{run}", "--prompt", ""], "--prompt is empty"),
    ("generate", ["--checkpoint", "{run}", "--prompt-ids", LONG_IDS], "max_seq_len"),
    ("generate", ["--checkpoint", "{run}", "--prompt-ids", ""], "--prompt-ids is empty"),
    ("generate", ["--checkpoint", "{run}", "--prompt-ids", "1,x"], "'x' is not a token id"),
    ("generate", ["--checkpoint", "{run}", "--prompt-ids", "1,99999"], "prompt token ids must be in"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--prompt-ids", "1"], "not allowed with"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--max-new-tokens", "many"], "invalid int value"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--temperature", "-0.5"], "--temperature -0.5"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--temperature", "nan"], "--temperature nan"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--top-p", "0"], "--top-p 0.0"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--top-p", "1.5"], "--top-p 1.5"),
    ("generate", ["--checkpoint", "{run}", "--prompt", "a", "--device", "gpu7"], "--device 'gpu7'"),
    ("generate", ["--checkpoint", "{run}"], "pass --prompt TEXT or --prompt-ids"),
    ("generate", ["--prompt", "a"], "--checkpoint"),
    # dsv3.tools.plan
    ("plan", [DEBUG, "--gpus", "0"], "--gpus 0: expected a positive integer"),
    ("plan", [DEBUG, "--gpus", "-8"], "--gpus -8"),
    ("plan", [DEBUG, "--gpus", "8", "--pp", "0"], "--pp 0"),
    ("plan", [DEBUG, "--gpus", "8", "--ep", "-1"], "--ep -1"),
    ("plan", [DEBUG, "--gpus", "8", "--dp", "0"], "--dp 0"),
    ("plan", [DEBUG, "--gpus", "8", "--batch-sequences", "0"], "--batch-sequences 0"),
    ("plan", [DEBUG, "--gpus", "6", "--pp", "4"], "not a multiple of pp=4"),
    ("plan", [DEBUG, "--gpus", "8", "--pp", "2", "--dp", "3"], "must equal pp × dp"),
    ("plan", [DEBUG, "--gpus", "8", "--pp", "1", "--ep", "3"], "ep=3 must divide dp=8"),
    ("plan", [DEBUG, "--gpus", "eight"], "invalid int value"),
    ("plan", [DEBUG], "--gpus"),
]


def test_bad_input_is_one_line_and_loses_nothing(world, capsys):
    fill = {k: str(v) for k, v in world.items()}
    fill["long_ids"] = ",".join(["1"] * world["max_seq_len"])  # no room left for a new token
    before = {k: snapshot(world[k]) for k in ("run", "export", "mine", "llama", "holey")}
    listing = sorted(os.listdir(world["base"]))
    for tool, argv, needle in BAD_INPUT:
        code = MAINS[tool]([a.format(**fill) for a in argv])
        out, err = capsys.readouterr()
        line = one_error_line(code, err, needle)
        assert line.startswith("error: "), (tool, argv, line)
        assert out == "", (tool, argv, out)
    assert {k: snapshot(world[k]) for k in before} == before
    assert sorted(os.listdir(world["base"])) == listing  # no new folder, no temp folder left


def test_marked_output_is_replaced_only_with_overwrite(world, capsys):
    out = world["export"]
    marker = json.load(open(os.path.join(out, MARKER)))
    assert marker["written_by"] == "python -m dsv3.checkpoint.hf export" and marker["inputs"] == [os.path.realpath(world["run"])]
    old = snapshot(out)
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("left by the earlier export's user\n")
    assert hf_main(["export", world["run"], out, "--dtype", "fp32", "--max-shard-size", "200KB", "--overwrite"]) == 0
    capsys.readouterr()
    new = snapshot(out)
    assert "stale.txt" not in new  # the folder was replaced, not merged into
    assert {k: v for k, v in new.items() if k != MARKER} == {k: v for k, v in old.items() if k != MARKER}
    assert not [n for n in os.listdir(world["base"]) if n.startswith(".tmp_")]
    # convert writes its own marker, not a copy of its input's
    conv = os.path.join(world["base"], "converted")
    assert hf_main(["convert", out, conv]) == 0
    assert json.load(open(os.path.join(conv, MARKER)))["written_by"] == "python -m dsv3.checkpoint.hf convert --to-bf16"
    assert hf_main(["convert", out, conv]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_keeps_the_old_output(world, capsys, monkeypatch):
    """A real SIGINT after the first shard (DSV3_FAULT): exit 130, the earlier export intact, no temp left.
    Python's own SIGINT handler is installed for the test, as in a terminal: a test process started in the
    background by a non-interactive shell inherits SIGINT ignored (POSIX), and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_cases(world, capsys, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_cases(world, capsys, monkeypatch):
    out = world["export"]
    old = snapshot(out)
    listing = sorted(os.listdir(world["base"]))
    monkeypatch.setenv("DSV3_FAULT", "hf_shard:1")
    monkeypatch.setenv("DSV3_FAULT_SIGNAL", "SIGINT")
    argv = ["export", world["run"], out, "--dtype", "fp32", "--max-shard-size", "200KB", "--overwrite"]
    one_error_line(hf_main(argv), capsys.readouterr().err, "interrupted", 130)
    assert snapshot(out) == old
    one_error_line(hf_main(["convert", out, world["new"]]), capsys.readouterr().err, "interrupted", 130)
    assert sorted(os.listdir(world["base"])) == listing  # no OUT, no .tmp_ folder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate_mod, "generate", interrupt)
    monkeypatch.setattr(plan_mod, "plan", interrupt)
    code = generate_mod.main(["--checkpoint", world["run"], "--prompt-ids", "1,2"])
    one_error_line(code, capsys.readouterr().err, "interrupted", 130)
    one_error_line(plan_mod.main([DEBUG, "--gpus", "8"]), capsys.readouterr().err, "interrupted", 130)


@pytest.mark.parametrize("args,needle", [(["--nproc", "0"], "'0'"), (["--nproc", "abc"], "'abc'"),
                                         (["--nproc"], "needs a value"), (["--nproc=-2"], "'-2'")])
def test_run_sh_rejects_a_bad_nproc_before_set_up(args, needle):
    # a nonexistent interpreter: had env.sh run, it would fail differently (and try to install torch)
    env = dict(os.environ, DSV3_PYTHON="/nonexistent/python")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "run.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=30)
    line = one_error_line(proc.returncode, proc.stderr, needle)
    assert line.startswith("error: --nproc")

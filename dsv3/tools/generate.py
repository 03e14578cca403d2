"""Text generation from a checkpoint with the compressed MLA cache (``dsv3.model.sampling.generate``: one
prefill over the prompt, then one token per step through the absorbed attention path).

``python -m dsv3.tools.generate --checkpoint DIR --prompt "def "`` where DIR is a Hugging Face checkpoint
(config.json), a training run folder (config.yaml + ckpt_*/, one-process or sharded checkpoints) or one
ckpt_* folder of a run; a run's tokenizer is its copy in ``RUN/tokenizer/``. Bad flags, an
empty prompt or one longer than the model's context (max_seq_len) are one line on stderr and exit 2.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from dsv3.model.sampling import generate


def _check_args(args) -> Optional[list[int]]:
    """Bad flags are one UserError, before the model is loaded; returns --prompt-ids parsed."""
    from dsv3.errors import UserError
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected a count >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: expected a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.prompt == "":
        raise UserError("--prompt is empty: give at least one character of text")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r}: expected a torch device such as cpu, cuda or cuda:1") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if args.prompt_ids is None:
        if args.prompt is None:
            raise UserError("pass --prompt TEXT or --prompt-ids 1,2,3")
        return None
    ids = [t.strip() for t in args.prompt_ids.split(",") if t.strip()]
    if not ids:
        raise UserError("--prompt-ids is empty: give at least one token id, e.g. --prompt-ids 1,2,3")
    bad = next((t for t in ids if not t.isdigit()), None)
    if bad is not None:
        raise UserError(f"--prompt-ids: {bad!r} is not a token id (expected comma-separated integers >= 0)")
    return [int(t) for t in ids]


def _check_prompt(prompt_ids: list[int], max_new_tokens: int, cfg) -> None:
    from dsv3.errors import UserError
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens: give a longer prompt")
    if any(not 0 <= t < cfg.vocab_size for t in prompt_ids):
        raise UserError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    room = cfg.max_seq_len - (1 if max_new_tokens > 0 else 0)  # a new token needs a position of its own
    if len(prompt_ids) > room:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens but the model's context (max_seq_len) is "
                        f"{cfg.max_seq_len}: at most {room} fit{' with room for a new token' if max_new_tokens else ''}; "
                        f"shorten the prompt")


def main(argv: Optional[list[str]] = None) -> int:
    from dsv3.errors import UserError
    from dsv3.checkpoint.hf import OneLineParser, load_for_inference

    p = OneLineParser(prog="python -m dsv3.tools.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint, run folder or ckpt_* folder")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text prompt (needs a tokenizer beside the checkpoint)")
    prompt.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or .model (default: found beside the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (>= 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, else > 0")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = the whole vocabulary")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype the weights are loaded in")
    p.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1")
    try:
        args = p.parse_args(argv)
        prompt_ids = _check_args(args)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model, tokenizer = load_for_inference(args.checkpoint, dtype=dtype, tokenizer_path=args.tokenizer)
        try:
            model.to(args.device)
        except (RuntimeError, AssertionError) as e:  # e.g. cuda:7 on a machine with fewer GPUs
            raise UserError(f"--device {args.device}: {(str(e).strip().splitlines() or ['unavailable'])[0]}") from None
        if prompt_ids is None:
            if tokenizer is None:
                raise UserError(f"no tokenizer found beside {args.checkpoint}: pass --tokenizer PATH or --prompt-ids")
            prompt_ids = tokenizer.encode(args.prompt)
        _check_prompt(prompt_ids, args.max_new_tokens, model.cfg)
        new_ids = generate(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if tokenizer is not None:
        print(tokenizer.decode(prompt_ids + new_ids))
    else:
        print(" ".join(str(t) for t in prompt_ids + new_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())

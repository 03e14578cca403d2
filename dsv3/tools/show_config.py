"""``python -m dsv3.tools.show_config CONFIG.yaml [key.path=value ...]``: the resolved config and its
parameter counts (computed on the meta device); ``--describe KEY`` and ``--help`` print the reference of
every key (dsv3.config_doc, docs/config.md)."""
from __future__ import annotations

import sys
from typing import Optional

import yaml

from dsv3.config import ConfigError, load_config, to_dict
from dsv3.config_doc import main as doc_main
from dsv3.model.params import count_params, format_counts


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--describe" or "-h" in argv or "--help" in argv:
        return doc_main(argv if argv[0] == "--describe" else ["--help"])
    if not argv or argv[0].startswith("-"):
        print("usage: python -m dsv3.tools.show_config CONFIG.yaml [key.path=value ...] | --describe KEY | --help",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(format_counts(count_params(cfg.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

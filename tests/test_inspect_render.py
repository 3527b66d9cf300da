"""PNG pictures and the HTML page, checked without a browser (the browser test is test_html_browser.py)."""
import io
import json
import os
import re

import pytest
import torch
from matplotlib.image import imread

from selfattn.app.plots import bench_png
from selfattn.inspect import attention_html, capture, head_grid_png, heatmap_png
from selfattn.inspect import files as _io
from selfattn.nn import Attention

TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]


def _png_array(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(data), format="png")


def test_heatmap_png_has_labels_sized_to_tokens(tmp_path):
    w = torch.softmax(torch.randn(9, 9), -1)
    data = heatmap_png(w, TOKENS, path=tmp_path / "h.png", title="layer 0, head 1")
    img = _png_array(data)
    assert (tmp_path / "h.png").read_bytes() == data
    assert img.shape[0] >= 400 and img.shape[1] >= 400
    assert len({tuple(p) for p in img.reshape(-1, img.shape[-1])[::37].tolist()}) > 20  # not blank
    with pytest.raises(ValueError, match="q_tokens"):
        heatmap_png(w, TOKENS[:-1])


def test_head_grid_and_bench_png(tmp_path):
    w = torch.softmax(torch.randn(6, 9, 9), -1)
    img = _png_array(head_grid_png(w, TOKENS, path=tmp_path / "g.png", title="layer 2"))
    assert img.shape[1] > img.shape[0]  # 4 heads per row, 2 rows: wider than tall
    rows = [{"impl": impl, "N": n, "tokens_per_s": 1e6 / n * f, "peak_mib": n * f / 100}
            for impl, f in (("selfattn", 1.0), ("sdpa", 2.0)) for n in (256, 512, 1024)]
    _png_array(bench_png(rows, path=tmp_path / "b.png"))
    assert sorted(os.listdir(tmp_path)) == ["b.png", "g.png"]  # no temporary files left behind


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", boom)
    with pytest.raises(OSError):
        heatmap_png(torch.eye(3), ["a", "b", "c"], path=target)
    assert os.listdir(tmp_path) == []


def _tiny_capture():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([Attention(16, 2) for _ in range(2)])

    def model(x):
        for layer in layers:
            x = x + layer(x)
        return x

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return model(x)

    return capture(M().eval(), torch.randn(1, len(TOKENS), 16))


def test_html_is_self_contained_and_escapes_tokens(tmp_path):
    cap = _tiny_capture()
    toks = TOKENS[:-1] + ["</script><b>x&"]
    page = attention_html(cap, toks, tmp_path / "v.html", title="t<1>", layer=1, head=1,
                          special=[t.startswith("[") for t in toks])
    assert (tmp_path / "v.html").read_text(encoding="utf-8") == page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    assert "<link" not in page and "@import" not in page
    assert page.count("</script>") == 2  # the data block and the code block: a token cannot close either
    blob = page.split('<script id="attn-data" type="application/json">')[1].split("</script>")[0]
    data = json.loads(blob)
    assert data["tokens"][-1] == "</script><b>x&" and data["initial"] == {"layer": 1, "head": 1}
    assert len(data["layers"]) == 2 and len(data["layers"][0]["weights"]) == 2
    assert abs(sum(data["layers"][0]["weights"][1][3]) - 1) < 1e-3
    assert "t&lt;1&gt;" in page
    with pytest.raises(ValueError, match="head"):
        attention_html(cap, TOKENS, head=2)
    with pytest.raises(ValueError, match="special"):
        attention_html(cap, TOKENS, special=[True])


def test_dollar_signs_and_tex_in_text_are_drawn_literally(tmp_path):
    """matplotlib reads '$...$' as math: "$5 and $10" or "$\\frac$" used to fail (or render as a formula) in the
    labels and the title; they are escaped and drawn as typed."""
    toks = ["$", "\\frac", "$5", "and", "$10", "^_{x}"]
    w = torch.softmax(torch.randn(6, 6), -1)
    data = heatmap_png(w, toks, path=tmp_path / "d.png", title="“$\\frac$ costs $5 and $10”")
    assert _png_array(data).shape[0] >= 400

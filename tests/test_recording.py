"""selfattn.recording: the one place attention records reach recorders (layers and the transformers backend both
call ``emit``), and the import order around it: nn imports nothing from selfattn.distributed."""
import ast
import threading
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import recording
from selfattn.nn import Attention, AttentionRecord, MultiheadAttention, record_attention


def test_emit_reaches_every_open_recorder_outermost_first():
    seen = []
    rec = AttentionRecord(None, *(torch.zeros(1, 1, 1, 1),) * 3, None, None, None, 1.0, torch.zeros(1, 1, 1))
    assert not recording.active()
    recording.emit(rec)  # no recorder: nothing happens
    with record_attention(lambda r: seen.append(("outer", r))):
        with record_attention(lambda r: seen.append(("inner", r))):
            assert recording.active()
            recording.emit(rec)
        recording.emit(rec)
    assert [w for w, _ in seen] == ["outer", "inner", "outer"] and all(r is rec for _, r in seen)
    assert not recording.active()
    with pytest.raises(TypeError, match="callback"):
        with record_attention(42):
            pass


def test_layers_emit_through_recording_and_other_threads_do_not_see_them():
    """Attention and MultiheadAttention both reach recorders through recording.emit; a recorder opened in one
    thread sees none of another thread's calls."""
    torch.manual_seed(0)
    a, m = Attention(16, 2, causal=True), MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(1, 5, 16)
    emitted, mine = [], []
    orig = recording.emit
    recording.emit = lambda r: (emitted.append(r.module), orig(r))
    try:
        with record_attention(mine.append):
            a(x)
            m(x, x, x, need_weights=False)
            m(x, x, x, need_weights=True)
            t = threading.Thread(target=lambda: a(x))
            t.start()
            t.join()
    finally:
        recording.emit = orig
    assert emitted == [a, m, m] and [r.module for r in mine] == [a, m, m]


def _selfattn_imports(path):
    """The selfattn packages/modules a source file imports (anywhere in it, function-local imports included)."""
    pkg = Path(selfattn.__file__).parent
    rel = path.relative_to(pkg).with_suffix("").parts  # e.g. ("nn", "attention")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel[:len(rel) - node.level])
                parts = base + (node.module.split(".") if node.module else [a.name for a in node.names][:1])
            elif (node.module or "").startswith("selfattn."):
                parts = node.module.split(".")[1:]
            else:
                continue
            found.add(parts[0] if parts else "")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("selfattn.")}
    return found


ABOVE = {"nn": {"distributed", "models", "inspect", "integrations", "app", "train"},
         "recording": {"nn", "distributed", "models", "inspect", "integrations", "app", "train"},
         "distributed": {"models", "inspect", "integrations", "app", "train"}}


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_layers_import_nothing_above_them(layer):
    """The stack of ARCHITECTURE.md for these layers: nn imports nothing from distributed (context parallelism
    reaches the layers through Attention.parallel), recording nothing above functional."""
    pkg = Path(selfattn.__file__).parent
    files = sorted((pkg / layer).glob("*.py")) if (pkg / layer).is_dir() else [pkg / f"{layer}.py"]
    assert files
    for f in files:
        bad = _selfattn_imports(f) & ABOVE[layer]
        assert not bad, f"{f.relative_to(pkg)} imports {sorted(bad)}, which sit above {layer}"

"""selfattn.recording: the one place attention records reach recorders (layers and the transformers backend both
call ``emit``), and the import order around it: nn imports nothing from selfattn.distributed."""
import subprocess
import sys
import threading

import pytest
import torch

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


def test_nn_imports_nothing_from_distributed():
    code = ("import sys, selfattn.nn, selfattn.models; "
            "print(sorted(m for m in sys.modules if m.startswith('selfattn.distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

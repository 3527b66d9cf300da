"""The one lowering (kernels/lowering.py): the C header's codes equal it, and the kernels read it."""
import re
from pathlib import Path

import torch

from selfattn.kernels import common, lowering

ABI_H = Path(lowering.__file__).resolve().parent.parent / "csrc" / "abi.h"


def _enum_codes(text: str) -> dict:
    """NAME -> value of every `enum { A = 1, B = 2 }` entry and `#define SA_X n` in the header."""
    codes = {}
    for body in re.findall(r"enum\s*\{([^}]*)\}", text):
        for name, value in re.findall(r"(SA_\w+)\s*=\s*(-?\d+)", body):
            codes[name] = int(value)
    for name, value in re.findall(r"#define\s+(SA_\w+)\s+(-?\d+)", text):
        codes[name] = int(value)
    return codes


def test_abi_header_codes_equal_lowering():
    codes = _enum_codes(ABI_H.read_text())
    atoms = {k[3:].lower(): v for k, v in codes.items()
             if k[3:].lower() in lowering.ATOM_CODES or k in ("SA_PAD_LEN", "SA_PAD_KEEP")}
    assert atoms == lowering.ATOM_CODES
    ops = {k[len("SA_OP_"):].lower(): v for k, v in codes.items() if k.startswith("SA_OP_")}
    assert ops == lowering.OP_CODES
    assert (codes["SA_MOD_DIST"], codes["SA_MOD_SOFTCAP"]) == (lowering.C_MOD_DIST, lowering.C_MOD_SOFTCAP)
    assert codes["SA_MAX_MODS"] == lowering.MAX_MODS
    dtypes = {"SA_F32": torch.float32, "SA_F64": torch.float64, "SA_BF16": torch.bfloat16, "SA_F16": torch.float16}
    assert {dtypes[k]: codes[k] for k in dtypes} == lowering.DTYPE_CODES


def test_header_parser_sees_a_changed_code(tmp_path):
    """The parser above would notice a renumbered atom (so the equality test can fail)."""
    text = ABI_H.read_text().replace("SA_WINDOW = 2", "SA_WINDOW = 9")
    assert _enum_codes(text)["SA_WINDOW"] == 9


def test_program_codes_and_strides():
    assert lowering.program_codes((0, 1, "not", "and", 2, "or")) == (0, 1, -3, -1, 2, -2)
    t = torch.zeros(3, 1, 5, 7)[:, :, :, ::2]  # (3, 1, 5, 4) non-contiguous
    assert lowering.strides0(t) == (35, 0, 7, 2)


def test_dropout_parameters_match_the_torch_hash():
    """The threshold the compiled kernels compare with is the torch hash's: keep iff hash >= threshold."""
    assert lowering.dropout_threshold(0.0) == 0 and lowering.dropout_threshold(0.5) == 1 << 31
    b, h = torch.arange(2), torch.arange(4)
    qp, kp = torch.arange(8)[:, None], torch.arange(16)[None, :]
    keep = common.dropout_keep(123, 0.3, b, h, qp, kp)
    # a head shard starting at global head 2 draws heads 2, 3 under head_seed(seed, 2)
    shard = common.dropout_keep(lowering.head_seed(123, 2), 0.3, b, torch.arange(2), qp, kp)
    assert torch.equal(shard, keep[:, 2:])
    assert not torch.equal(shard, keep[:, :2])

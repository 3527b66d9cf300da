"""Device helpers every Triton kernel of selfattn shares: the dropout hash, the lowered mask atoms, the lowered
score modifiers. Imported only when triton is installed (``kernels/triton/__init__.py`` guards the import).

Conventions inside a tile: ``i`` (BM, 1) local query rows, ``j`` (1, BN) local keys, ``valid`` (BM, BN) in-bounds
entries; ``b`` the batch row, ``h`` the query head (a scalar, or (BM, 1) in the decode kernel whose rows mix the
G heads of one KV head). Scores ``s`` are float32 in natural-log units until the kernels multiply by log2(e).

Mask atoms (``_lower.mask_args`` writes their parameters, 16 int64 per atom, into ``P``):
  0 q0, 1 k0, 2 left, 3 right, 4 offset of int64 data a, 5 its batch stride, 6 offset of int64 data b, 7 its batch
  stride, 8 offset of uint8 data, 9..12 its strides (b, h, q, k; 0 on broadcast dims).
Kinds: 1 causal, 2 window, 3 pad_len, 4 pad_keep, 5 document, 6 prefix, 7 dense (as ``masks.Atom``). Up to four
atoms combine by a truth table ``TT`` (bit n of TT is the mask's value when the atoms' bits spell n), so any
postfix program of and/or/not costs the same four integer ops per partial-tile entry; ``ALL_AND`` takes the
plain ``&`` chain instead.

Modifier slots (kinds 1 alibi, 2 table -- T5 buckets gathered per key-query distance --, 3 softcap):
``MPI`` (4, 2) int64 [distance shift, symmetric], ``MPF`` (4,) float32 caps, ``SL`` (4, Hq) float32 slopes,
``TAB`` (4, Hq, nd) float32 values per distance index j - i + Nq - 1.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NPARAM = 16  # int64 parameters per mask atom


@triton.jit
def dot(a, b, IN_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST: operands widened to float32 first -- triton's interpreter multiplies
    bfloat16 tiles wrongly (3.9.0), and the products of bf16 values are exact in fp32, so this is the tensor
    cores' math."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=IN_PREC)


# -- dropout: the counter hash of kernels/common.dropout_keep, in uint32 ----------------------------------------
@triton.jit
def mix32(x):
    x = (x ^ (x >> 16)) * 0x7FEB352D
    x = (x ^ (x >> 15)) * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def dropout_keep(seed, thresh, b, h, qp, kp):
    """keep (BM, BN) for global positions qp (BM, 1), kp (1, BN) int32; seed uint32-valued, thresh int64."""
    hb = mix32(seed.to(tl.uint32) + b.to(tl.uint32) * 0x9E3779B1 + h.to(tl.uint32) * 0x85EBCA77)
    hr = mix32(hb ^ qp.to(tl.uint32, bitcast=True))
    hk = mix32((hr ^ kp.to(tl.uint32, bitcast=True)) + 0x9E3779B9)
    return hk.to(tl.int64) >= thresh


# -- masks -------------------------------------------------------------------------------------------------------
@triton.jit
def _atom(KIND: tl.constexpr, P, I64, U8, slot: tl.constexpr, b, h, i, j, valid):
    base = P + slot * 16
    qp = tl.load(base + 0) + i  # (BM, 1) global query positions
    kp = tl.load(base + 1) + j  # (1, BN)
    if KIND == 1:
        r = kp <= qp
    elif KIND == 2:
        r = (kp >= qp - tl.load(base + 2)) & (kp <= qp + tl.load(base + 3))
    elif KIND == 3:
        r = kp < tl.load(I64 + tl.load(base + 4) + b * tl.load(base + 5))
    elif KIND == 4:
        ptr = U8 + tl.load(base + 8) + b * tl.load(base + 9) + kp * tl.load(base + 12)
        r = tl.load(ptr, mask=valid, other=0) != 0
    elif KIND == 5:
        iq = tl.load(I64 + tl.load(base + 4) + b * tl.load(base + 5) + qp, mask=valid, other=0)
        ik = tl.load(I64 + tl.load(base + 6) + b * tl.load(base + 7) + kp, mask=valid, other=1)
        r = iq == ik
    elif KIND == 6:
        r = (kp < tl.load(I64 + tl.load(base + 4) + b * tl.load(base + 5))) | (kp <= qp)
    else:  # 7 dense
        ptr = (U8 + tl.load(base + 8) + b * tl.load(base + 9) + h * tl.load(base + 10) + qp * tl.load(base + 11)
               + kp * tl.load(base + 12))
        r = tl.load(ptr, mask=valid, other=0) != 0
    return r & valid


@triton.jit
def mask_tile(P, I64, U8, b, h, i, j, valid, NA: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
              K2: tl.constexpr, K3: tl.constexpr, TT: tl.constexpr, ALL_AND: tl.constexpr):
    """Allowed entries (BM, BN) of a partial tile (always False outside ``valid``)."""
    if NA == 0:  # no mask: only the bounds (the ragged last block)
        return valid
    a0 = _atom(K0, P, I64, U8, 0, b, h, i, j, valid)
    if NA == 1:
        if ALL_AND:
            r = a0
        else:
            n = a0.to(tl.int32)
            r = (((n * 0 + TT) >> n) & 1) != 0
    else:
        a1 = _atom(K1, P, I64, U8, 1, b, h, i, j, valid)
        if ALL_AND:
            r = a0 & a1
            if NA >= 3:
                r = r & _atom(K2, P, I64, U8, 2, b, h, i, j, valid)
            if NA >= 4:
                r = r & _atom(K3, P, I64, U8, 3, b, h, i, j, valid)
        else:
            n = a0.to(tl.int32) + a1.to(tl.int32) * 2
            if NA >= 3:
                n = n + _atom(K2, P, I64, U8, 2, b, h, i, j, valid).to(tl.int32) * 4
            if NA >= 4:
                n = n + _atom(K3, P, I64, U8, 3, b, h, i, j, valid).to(tl.int32) * 8
            r = (((n * 0 + TT) >> n) & 1) != 0
    return r & valid


# -- score modifiers ---------------------------------------------------------------------------------------------
@triton.jit
def tanh(x):
    """tanh in float32 to a few ulp (libdevice's is not in the interpreter): odd Taylor series below 1/8, where
    (1 - e)/(1 + e) would cancel, the exponential form above."""
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.125, small, big)


@triton.jit
def _mod(KIND: tl.constexpr, slot: tl.constexpr, s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid):
    """One modifier op on s (BM, BN): (modified s, ds_out/ds_in or 1.0)."""
    der = 1.0
    if KIND == 1:
        d = j - i + tl.load(MPI + slot * 2)  # (BM, BN) int key - query distance
        sym = tl.load(MPI + slot * 2 + 1)
        d = tl.where(sym != 0, -tl.abs(d), d)
        s = s + tl.load(SL + slot * Hq + h) * d.to(tl.float32)
    elif KIND == 2:
        s = s + tl.load(TAB + (slot * Hq + h) * nd + (j - i + Nq - 1), mask=valid, other=0.0)
    elif KIND == 3:
        cap = tl.load(MPF + slot)
        t = tanh(s / cap)
        s = cap * t
        der = 1.0 - t * t
    return s, der


@triton.jit
def apply_mods(s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid, M0: tl.constexpr, M1: tl.constexpr,
               M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    """The lowered modifier chain on s: (s, dall, dafter) where dall = d s_out / d s_in of the whole chain and
    dafter = the same for the ops after slot T5_SLOT (the table gradient sees only those)."""
    s, d0 = _mod(M0, 0, s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid)
    s, d1 = _mod(M1, 1, s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid)
    s, d2 = _mod(M2, 2, s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid)
    s, d3 = _mod(M3, 3, s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid)
    dall = d0 * d1 * d2 * d3
    da = 1.0
    if T5_SLOT < 1:
        da = da * d1
    if T5_SLOT < 2:
        da = da * d2
    if T5_SLOT < 3:
        da = da * d3
    return s, dall, da

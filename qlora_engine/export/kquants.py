"""llama.cpp's k-quant formats Q4_K and Q6_K, which the `gguf` package reads but cannot write.

`quantize_q4_K` / `quantize_q6_K` follow ggml's reference quantizers (`quantize_row_q4_K_ref` with
`make_qkx2_quants`, `quantize_row_q6_K_ref` with `make_qx_quants(rmse_type=1)`), the ones
llama-quantize uses without an importance matrix, in float32 numpy with sums taken in the C loops'
order, so that the bytes are those of the C reference compiled without FMA contraction.
`dequantize_q4_K` / `dequantize_q6_K` read the published block layouts (ggml-common.h) back, as
a check independent of the `gguf` package's dequantizer. Touches nothing but numpy arrays.

Block layouts, little-endian, 256 values per block:
  Q4_K (144 B): fp16 d, fp16 dmin, 12 B of eight 6-bit (scale, min) pairs, 128 B of 4-bit q;
                x = d·sc_j·q − dmin·m_j for sub-block j of 32 values.
  Q6_K (210 B): 128 B low 4 bits, 64 B high 2 bits, 16 int8 scales, fp16 d (last);
                x = d·sc_j·(q − 32) for sub-block j of 16 values.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
F32 = np.float32
_CHUNK_BLOCKS = 8192  # 2M values at a time: the per-block temporaries stay at a few tens of MiB


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # ggml's nearest_int adds 1.5·2^23 in float32: round half to even, as np.rint does on float32
    return np.rint(v.astype(F32)).astype(np.int32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis one element after another in float32, as the C loops add (numpy's
    pairwise sum rounds differently, which would change some chosen scales)."""
    acc = np.zeros(a.shape[:-1], dtype=F32)
    for i in range(a.shape[-1]):
        acc += a[..., i]
    return acc


def _blocks(data: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    data = np.ascontiguousarray(data, dtype=F32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"{what} needs rows that are a multiple of {QK_K} values, got {data.shape[-1]}")
    return data.reshape(-1, QK_K), data.shape


def _chunked(fn, data: np.ndarray, what: str, type_size: int) -> np.ndarray:
    x, shape = _blocks(data, what)
    out = np.empty((x.shape[0], type_size), dtype=np.uint8)
    for i in range(0, x.shape[0], _CHUNK_BLOCKS):
        out[i : i + _CHUNK_BLOCKS] = fn(x[i : i + _CHUNK_BLOCKS])
    return out.reshape(*shape[:-1], shape[-1] // QK_K * type_size)


# ----------------------------------------------------------------------------------------- Q4_K


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per row of x [N, n] (weights w): the scale, the min (returned as -min >= 0) and the levels
    L in 0..nmax minimizing sum w·(scale·L + min − x)², searched over nstep+1 trial scales. A better
    trial replaces the min used by the trials after it, as in the C loop."""
    mx = x.max(axis=1)
    mn = np.minimum(x.min(axis=1), F32(0))
    flat = mx == mn
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    iscale = (F32(nmax) / np.where(flat, F32(1), mx - mn)).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(F32) + mn[:, None] - x
    best = _seqsum(w * (diff * diff))
    for step in range(nstep + 1):
        rng = np.where(flat, F32(1), mx - mn).astype(F32)
        isc = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng).astype(F32)
        l = np.clip(_nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = l.astype(F32)
        sum_l, sum_l2, sum_xl = _seqsum(w * lf), _seqsum(w * lf * lf), _seqsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        s = (sum_w * sum_xl - sum_x * sum_l) / Ds
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = m > 0  # the min may not be above 0: refit the scale alone
        s = np.where(pos, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), s).astype(F32)
        m = np.where(pos, F32(0), m).astype(F32)
        d2 = s[:, None] * lf + m[:, None] - x
        err = _seqsum(w * (d2 * d2))
        take = ok & (err < best) & ~flat
        L = np.where(take[:, None], l, L)
        best = np.where(take, err, best)
        scale = np.where(take, s, scale)
        mn = np.where(take, m, mn)
    return np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32), np.where(flat[:, None], 0, L)


def _q4_K_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 8, 32)
    xs = x.reshape(-1, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / F32(32)).astype(F32)
    scales, mins, L = _make_qkx2_quants(xs, (av_x[:, None] + np.abs(xs)).astype(F32))
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    # C stores nearest_int into a uint8 before MIN(63, ·): keep that truncation
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    sc = np.zeros((nb, 12), dtype=np.uint8)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    # the levels again, against the scales as stored (6-bit, times the fp16 super-scales)
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    nz = d != 0
    again = np.clip(_nearest_int((x + dm[:, :, None]) / np.where(nz, d, F32(1))[:, :, None]), 0, 15)
    L = np.where(nz[:, :, None], again, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)  # low nibbles: sub-block 2c, high: 2c+1
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), sc, qs], axis=1)


def quantize_q4_K(data: np.ndarray) -> np.ndarray:
    """float values [..., n] (n a multiple of 256) -> Q4_K bytes [..., n/256·144]."""
    return _chunked(_q4_K_blocks, data, "Q4_K", Q4_K_BYTES)


def _q4_K_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of each block from its 12 packed bytes."""
    s = sc.astype(np.uint8)
    scale, mn = np.empty((s.shape[0], 8), np.uint8), np.empty((s.shape[0], 8), np.uint8)
    for j in range(4):
        scale[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
    for j in range(4, 8):
        scale[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
        mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return scale, mn


def dequantize_q4_K(raw: np.ndarray) -> np.ndarray:
    """Q4_K bytes [..., k·144] -> float32 [..., k·256]."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, Q4_K_BYTES)
    d = b[:, 0:2].copy().view(np.float16).astype(F32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(F32)
    scale, mn = _q4_K_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(F32)
    out = (d * scale.astype(F32))[:, :, None] * q - (dmin * mn.astype(F32))[:, :, None]
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // Q4_K_BYTES * QK_K)


# ----------------------------------------------------------------------------------------- Q6_K


def _make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [N, n]: a signed scale and levels L in 0..2·nmax−1 (q = L − nmax) minimizing
    sum x²·(scale·q − x)², over 19 trial scales around −nmax / (the value of largest magnitude)."""
    n_rows = x.shape[0]
    idx = np.abs(x).argmax(axis=1)  # the first of equal magnitudes, as the C loop's strict '>'
    vmax = x[np.arange(n_rows), idx]
    zero = np.abs(vmax) < F32(1e-15)
    vmax = np.where(zero, F32(1), vmax).astype(F32)
    w = x * x

    def trial(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    l, sumlx, suml2 = trial((F32(-nmax) / vmax).astype(F32))
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
    best = (scale * sumlx).astype(F32)
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial((-(F32(nmax) + F32(0.1) * F32(step)) / vmax).astype(F32))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = (sumlx / np.where(suml2 > 0, suml2, F32(1))).astype(F32)
        L = np.where(take[:, None], l + nmax, L)
        scale = np.where(take, s, scale)
        best = np.where(take, s * sumlx, best).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


def _q6_K_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 16, 16)
    scales, L = _make_qx_quants(x.reshape(-1, 16))
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    zero = np.abs(max_scale) < F32(1e-15)
    iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
    d16 = (F32(1) / iscale).astype(np.float16)
    q_sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(F32)[:, None] * q_sc.astype(F32)
    nz = d != 0
    again = np.clip(_nearest_int(x / np.where(nz, d, F32(1))[:, :, None]), -32, 31) + 32
    L = np.where(nz[:, :, None], again, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # 2 halves of 4 rows of 32
    ql = np.empty((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), q_sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)],
                         axis=1)  # fmt: skip
    out[zero] = 0  # an all-zero block is stored as zero bytes
    return out


def quantize_q6_K(data: np.ndarray) -> np.ndarray:
    """float values [..., n] (n a multiple of 256) -> Q6_K bytes [..., n/256·210]."""
    return _chunked(_q6_K_blocks, data, "Q6_K", Q6_K_BYTES)


def dequantize_q6_K(raw: np.ndarray) -> np.ndarray:
    """Q6_K bytes [..., k·210] -> float32 [..., k·256]."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, Q6_K_BYTES)
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(F32)
    d = b[:, 208:210].copy().view(np.float16).astype(F32)
    q = np.empty((b.shape[0], 2, 4, 32), dtype=np.int16)  # per 128-half: four runs of 32 values
    q[:, :, 0] = (ql[:, :, 0:32] & 0xF) | (((qh >> 0) & 3) << 4)
    q[:, :, 1] = (ql[:, :, 32:64] & 0xF) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = (q - 32).reshape(-1, 16, 16).astype(F32)
    out = (d * sc)[:, :, None] * q
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // Q6_K_BYTES * QK_K)

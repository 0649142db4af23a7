"""Native CPU kernels of the counterfactual world: the lane query, the route tracking and the red-light /
stop-sign rules as plain C loops.

The eager lane query (:meth:`craft.finetune.proxy._LaneIndex.query`) sorts the ``H * B * G`` points by
grid cell, copies every (point, segment) pair's features and runs some forty tensor ops per pair; the
route tracking runs a dozen ops per step on ``(window, candidate)`` blocks, the light and stop-sign rules
some thirty bool ops on ``(step, candidate, slot)`` blocks. The same rules as C loops need no copies and no
temporaries: the lane query radix-sorts the points by cell and sweeps each cell's points segment by segment
in a branch-free loop the compiler vectorises (the running picks kept per point); the route tracking, light
and stop-sign rules run one loop per candidate (and light / sign) over the steps. Here they are, in C,
compiled once per machine with the system C compiler (``cc``, or ``$CC``) into a shared library cached
under ``$XDG_CACHE_HOME/craft`` (``~/.cache/craft``; written to a temporary name and renamed), and called
through :mod:`ctypes` on the tensors' memory (CPU, contiguous, float32 / int64).

The loops apply the same float32 operations in the same order as the tensor code (no fused multiply-adds:
``-ffp-contract=off``) and the same first-index tie rule: their flags, lane picks and light / stop-sign
violations are the tensor code's, their distances within float rounding of it (the tests compare them on
varied states). Used when ``CounterfactualWorld(..., compile=True)`` and the tensors are
on the CPU; if the compiler is missing or the build fails, :func:`load` prints one line to stderr and
returns None, and the tensor code runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from craft.errors import CraftError

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FAR 1e30f

/* c ? a : b without a branch (the compiler vectorises loops of these) */
static inline float sel(int c, float a, float b)
{
    union { float f; int32_t i; } ua = {a}, ub = {b}, r;
    int32_t m = -c;
    r.i = (ua.i & m) | (ub.i & ~m);
    return r.f;
}

/* One segment (features f, index kf in its cell's list) against the L points of a run: the pair terms and
   the running first minima; branch-free, so the compiler vectorises it along the points. */
static void sweep(int64_t L, const float *restrict X, const float *restrict Y, const float *restrict C,
                  const float *restrict S, const float *restrict f, float kf, float *restrict DMIN,
                  float *restrict NEAR, float *restrict CBEST, float *restrict BEST, float *restrict DBEST,
                  float *restrict EMIN, float *restrict ESEG, int32_t *restrict ON)
{
    const float ax = f[0], ay = f[1], dx = f[2], dy = f[3], il2 = f[4], hw2 = f[5], reach = f[6];
    const float ch = f[7], shd = f[8], tlo = f[9], thi = f[10], edge = f[13];
        for (int64_t j = 0; j < L; j++) {  /* branch-free: vectorised along the run's points */
            float rx = X[j] - ax, ry = Y[j] - ay;
            float t = rx * dx;
            t = t + ry * dy;
            t = t * il2;
            float u = sel(t < 0.0f, 0.0f, t);
            u = sel(u > 1.0f, 1.0f, u);
            float ex = rx - u * dx, ey = ry - u * dy;
            float d2 = ex * ex;
            d2 = d2 + ey * ey;
            ON[j] |= (t > tlo) & (t < thi) & (d2 <= hw2);
            float d = sqrtf(d2);
            float cand = d + sel(d > reach, FAR, 0.0f);  /* FAR + d beyond the pick's reach */
            int lt = cand < DMIN[j];
            DMIN[j] = sel(lt, cand, DMIN[j]);
            NEAR[j] = sel(lt, kf, NEAR[j]);
            float cosd = C[j] * ch;
            cosd = cosd + S[j] * shd;
            float cost = cand + (-2.0f) * cosd;
            int lb = cost < CBEST[j];
            CBEST[j] = sel(lb, cost, CBEST[j]);
            BEST[j] = sel(lb, kf, BEST[j]);
            DBEST[j] = sel(lb, d, DBEST[j]);
            float ec = d + sel(d > edge, FAR, 0.0f);
            int le = ec < EMIN[j];
            EMIN[j] = sel(le, ec, EMIN[j]);
            ESEG[j] = sel(le, kf, ESEG[j]);
        }
}

/* The proxy's lane rules at Q points (craft/finetune/proxy.py, _LaneIndex.query and lane_pairs).
   Point i lies on map mb[(i / group) % nb]. feat: (S1, 16) float32, one 64-byte row per segment of the
   segment table (AX AY DX DY IL2 HW2 REACH CH SH TLO THI JUNCTION SHOULDER EDGE_REACH HW, pad);
   lane_of: (S1,) lane of each segment; grid: origin (M, 2), shape (M, 2), cell_offset (M,), start / count
   (cells,), items. Outputs (Q,): offroad, opposite, emergency (0 / 1), center, lane.
   The points are sorted by cell (two 16-bit radix passes); each run of points in one cell is then swept
   segment by segment, the inner loop running along the run's points (vectorised by the compiler), with
   the running first minima kept per point. Returns 0, or -1 if out of memory (nothing written then). */
int lane_query(int64_t Q, const float *px, const float *py, const float *cy, const float *sy,
               const int64_t *mb, int64_t group, int64_t nb,
               const float *origin, const int64_t *shape, const int64_t *cell_offset, float cell, int64_t ncells,
               const int64_t *start, const int64_t *count, const int64_t *items,
               const float *feat, const int64_t *lane_of, float cos_wrong, float cap,
               uint8_t *offroad, uint8_t *opposite, uint8_t *emergency, float *center, int64_t *lane)
{
    uint32_t *key = malloc(sizeof(uint32_t) * 2 * Q);
    int32_t *ord = malloc(sizeof(int32_t) * 2 * Q);
    uint32_t *hist = malloc(sizeof(uint32_t) * 65536);
    float *buf = malloc(sizeof(float) * 11 * (Q > 0 ? Q : 1));
    int32_t *ibuf = malloc(sizeof(int32_t) * (Q > 0 ? Q : 1));
    if (!key || !ord || !hist || !buf || !ibuf) {
        free(key); free(ord); free(hist); free(buf); free(ibuf);
        return -1;
    }
    /* 1. the cell of every point; points outside the grid or in an empty cell keep the defaults */
    int64_t n = 0, gi = 0, bi = 0;  /* i = (. * nb + bi) * group + gi, without divisions */
    for (int64_t i = 0; i < Q; i++, gi++) {
        if (gi == group) { gi = 0; if (++bi == nb) bi = 0; }
        int64_t m = mb[bi];
        float fx = (px[i] - origin[2 * m]) / cell;
        float fy = (py[i] - origin[2 * m + 1]) / cell;
        offroad[i] = 1; opposite[i] = 0; emergency[i] = 0; center[i] = cap; lane[i] = -1;
        /* floor(f) >= 0 iff f >= 0, and floor(f) < n iff f < n for an integer n; NaN fails both */
        if (!(fx >= 0.0f && fy >= 0.0f && fx < (float)shape[2 * m] && fy < (float)shape[2 * m + 1]))
            continue;
        int64_t cid = cell_offset[m] + (int64_t)fx * shape[2 * m + 1] + (int64_t)fy;  /* truncation = floor */
        if (cid < 0 || cid >= ncells || count[cid] == 0)
            continue;
        key[n] = (uint32_t)cid;
        ord[n] = (int32_t)i;
        n++;
    }
    /* 2. sort (cell, point) by cell: LSD radix, 2 x 16 bits (cells < 2^32, checked by the caller) */
    uint32_t *k0 = key, *k1 = key + Q;
    int32_t *o0 = ord, *o1 = ord + Q;
    for (int pass = 0; pass < 2; pass++) {
        int sh = 16 * pass;
        memset(hist, 0, sizeof(uint32_t) * 65536);
        for (int64_t j = 0; j < n; j++) hist[(k0[j] >> sh) & 0xFFFF]++;
        uint32_t acc = 0;
        for (int b = 0; b < 65536; b++) { uint32_t c = hist[b]; hist[b] = acc; acc += c; }
        for (int64_t j = 0; j < n; j++) {
            uint32_t d = hist[(k0[j] >> sh) & 0xFFFF]++;
            k1[d] = k0[j]; o1[d] = o0[j];
        }
        uint32_t *kt = k0; k0 = k1; k1 = kt;
        int32_t *ot = o0; o0 = o1; o1 = ot;
    }
    /* 3. runs of one cell: segment by segment, along the run's points */
    float *restrict X = buf, *restrict Y = buf + Q, *restrict C = buf + 2 * Q, *restrict S = buf + 3 * Q;
    float *restrict DMIN = buf + 4 * Q, *restrict CBEST = buf + 5 * Q, *restrict DBEST = buf + 6 * Q;
    float *restrict EMIN = buf + 7 * Q;
    float *restrict NEAR = buf + 8 * Q, *restrict BEST = buf + 9 * Q, *restrict ESEG = buf + 10 * Q;  /* k as float */
    int32_t *restrict ON = ibuf;
    for (int64_t r0 = 0; r0 < n;) {
        int64_t r1 = r0 + 1;
        while (r1 < n && k0[r1] == k0[r0]) r1++;
        int64_t L = r1 - r0, cid = k0[r0], K = count[cid];
        const int64_t *it = items + start[cid];
        for (int64_t j = 0; j < L; j++) {
            int64_t i = o0[r0 + j];
            X[j] = px[i]; Y[j] = py[i]; C[j] = cy[i]; S[j] = sy[i];
            /* running first minima (strict <); every pick value is finite, so k = 0 always takes them */
            DMIN[j] = INFINITY; CBEST[j] = INFINITY; EMIN[j] = INFINITY; DBEST[j] = 0.0f;
            NEAR[j] = 0.0f; BEST[j] = 0.0f; ESEG[j] = 0.0f; ON[j] = 0;
        }
        for (int64_t k = 0; k < K; k++) {
            const float *f = feat + 16 * it[k];
            sweep(L, X, Y, C, S, f, (float)k, DMIN, NEAR, CBEST, BEST, DBEST, EMIN, ESEG, ON);
        }
        for (int64_t j = 0; j < L; j++) {
            int64_t i = o0[r0 + j];
            offroad[i] = !ON[j];
            if (DMIN[j] < 0.5f * FAR) {
                const float *f = feat + 16 * it[(int64_t)NEAR[j]];
                float cn = C[j] * f[7] + S[j] * f[8];
                opposite[i] = cn < cos_wrong && !(f[11] > 0.0f);
                center[i] = DBEST[j];
                lane[i] = lane_of[it[(int64_t)BEST[j]]];
            }
            const float *fe = feat + 16 * it[(int64_t)ESEG[j]];
            if (EMIN[j] < 0.5f * FAR && fe[12] > 0.0f && EMIN[j] <= fe[14])
                emergency[i] = 1;
        }
        r0 = r1;
    }
    free(key); free(ord); free(hist); free(buf); free(ibuf);
    return 0;
}

/* The world's red-light rule over whole trajectories (craft/finetune/proxy.py, the lights block of
   _score_chunk; events._red_lights): for Qs candidates and their n checked red lights, whether step h
   runs one. pos: (H, Qs, 2), cy, sy: (H, Qs) the ego after each step; half: (Qs,) half its length; rear0:
   (Qs, 2) its rear point at the snapshot; cur, ctrl: (H, Qs) its lane and the light controlling that lane
   (-1: none); per (candidate, light), each (Qs, n): lux, luy (light heading), lpx, lpy (position), llane,
   lk (light index), lok (checked), lhw (lane half width). Output run: (H, Qs) 0 / 1. */
void red_light_runs(int64_t H, int64_t Qs, int64_t n, const float *pos, const float *cy, const float *sy,
                    const float *half, const float *rear0, const int64_t *cur, const int64_t *ctrl,
                    const float *lux, const float *luy, const float *lpx, const float *lpy, const int64_t *llane,
                    const int64_t *lk, const uint8_t *lok, const float *lhw, float radius, uint8_t *run)
{
    for (int64_t q = 0; q < Qs; q++) {
        for (int64_t l = 0; l < n; l++) {
            int64_t a = q * n + l;
            float ux = lux[a], uy = luy[a], lx = lpx[a], ly = lpy[a];
            /* along-heading coordinate of the rear point at the snapshot (h = -1) */
            float prx = rear0[2 * q] - lx, pry = rear0[2 * q + 1] - ly;
            float prev = prx * ux;
            prev = prev + pry * uy;
            for (int64_t h = 0; h < H; h++) {
                int64_t o = h * Qs + q;
                float c = cy[o], s = sy[o], x = pos[2 * o], y = pos[2 * o + 1];
                float rx = x - half[q] * c, ry = y - half[q] * s;
                float relx = rx - lx, rely = ry - ly;
                float along = relx * ux;
                along = along + rely * uy;
                float lateral = ux * rely - uy * relx;
                int64_t cl = cur[o];
                int match = cl >= 0 && (llane[a] == cl || ctrl[o] == lk[a]);
                float hd = c * ux;
                hd = hd + s * uy;
                float nx = x - lx, ny = y - ly;
                float nd = nx * nx;
                nd = nd + ny * ny;
                int hit = lok[a] && prev < 0.0f && along >= 0.0f && hd > 0.0f && sqrtf(nd) <= radius &&
                          (match || fabsf(lateral) <= lhw[a]);
                if (l == 0) run[o] = (uint8_t)hit; else run[o] |= (uint8_t)hit;
                prev = along;
            }
        }
    }
}

/* The world's stop-sign rule over whole trajectories (craft/finetune/proxy.py, the stop-sign block of
   _score_chunk with _stop_violations; events._stop_signs): the ego is inside a sign's trigger box (heading
   its way) after a step, and slow there below stop_speed; leaving the box without a slow step since
   entering it (or, before the first exit, without the snapshot's served flag) is a violation.
   pos: (H, Qs, 2), cy, sy, speed: (H, Qs); per (candidate, sign), (Qs, n): trig (.., 5) box centre x / y,
   heading, length, width; bux, buy: cos / sin of the box heading; hc, hs: of the sign's heading; ok,
   inside0, served0: 0 / 1. Output viol: (H, Qs) 0 / 1, a violation of any sign at step h. */
void stop_violations(int64_t H, int64_t Qs, int64_t n, const float *pos, const float *cy, const float *sy,
                     const float *speed, const float *trig, const float *bux, const float *buy, const float *hc,
                     const float *hs, const uint8_t *ok, const uint8_t *inside0, const uint8_t *served0,
                     float stop_speed, uint8_t *viol)
{
    for (int64_t o = 0; o < H * Qs; o++) viol[o] = 0;
    for (int64_t q = 0; q < Qs; q++) {
        for (int64_t l = 0; l < n; l++) {
            int64_t a = q * n + l;
            if (!ok[a]) continue;  /* an unchecked slot: never inside, never left */
            const float *tb = trig + 5 * a;
            float ux = bux[a], uy = buy[a], hl = 0.5f * tb[3], hw = 0.5f * tb[4];
            int was = inside0[a], served = served0[a];
            for (int64_t h = 0; h < H; h++) {
                int64_t o = h * Qs + q;
                float relx = pos[2 * o] - tb[0], rely = pos[2 * o + 1] - tb[1];
                float al = relx * ux;
                al = al + rely * uy;
                float la = ux * rely - uy * relx;
                float hd = cy[o] * hc[a];
                hd = hd + sy[o] * hs[a];
                int in = fabsf(al) <= hl && fabsf(la) <= hw && hd > 0.0f;
                if (in && fabsf(speed[o]) < stop_speed) served = 1;
                if (was && !in) {  /* leaving the box */
                    if (!served) viol[o] = 1;
                    served = 0;
                }
                was = in;
            }
        }
    }
}

/* Squared distances and projection parameters of one point to A consecutive route segments (branch-free:
   vectorised along the segments). */
static void window_d2(int64_t A, float x, float y, const float *restrict wx, const float *restrict wy,
                      const float *restrict wdx, const float *restrict wdy, const float *restrict wil,
                      float *restrict d2s, float *restrict us)
{
    for (int64_t a = 0; a < A; a++) {
        float rx = x - wx[a], ry = y - wy[a];
        float u = rx * wdx[a];
        u = u + ry * wdy[a];
        u = u * wil[a];
        u = sel(u < 0.0f, 0.0f, u);
        u = sel(u > 1.0f, 1.0f, u);
        float ex = rx - u * wdx[a], ey = ry - u * wdy[a];
        float d2 = ex * ex;
        d2 = d2 + ey * ey;
        d2s[a] = d2;
        us[a] = u;
    }
}

/* The proxy's route tracking (craft/finetune/proxy.py, _Route.tracker / route_step) over H steps.
   pos: (H, Q, 2); b: (Q,) state of each candidate; j0: (Q,) segment of the snapshot's projection;
   win: (5, N) start x / y, vector x / y, 1 / length^2 of the N = states * nseg route segments;
   cum, len, ucos, usin: (N,). Window of a step: segments clamp(j - back + a, 0, nseg - 1), a < A.
   Outputs (H, Q): dist, s (arc length), rc, rs (direction of the chosen segment). */
void route_track(int64_t H, int64_t Q, const float *pos, const int64_t *b, const int64_t *j0,
                 const float *win, int64_t N, int64_t nseg, int64_t back, int64_t A,
                 const float *cum, const float *len, const float *ucos, const float *usin,
                 float *dist, float *s, float *rc, float *rs)
{
    const float *WX = win, *WY = win + N, *WDX = win + 2 * N, *WDY = win + 3 * N, *WIL = win + 4 * N;
    for (int64_t q = 0; q < Q; q++) {
        int64_t base = b[q] * nseg, j = j0[q];
        for (int64_t h = 0; h < H; h++) {
            float x = pos[2 * (h * Q + q)], y = pos[2 * (h * Q + q) + 1];
            float d2min = 0.0f, ubest = 0.0f;
            int64_t kbest = -1;
            int64_t lo = j - back;
            if (A <= 32 && lo >= 0 && lo + A <= nseg) {  /* the window lies inside the route: contiguous rows */
                float d2s[32], us[32];
                int64_t r = base + lo;
                window_d2(A, x, y, WX + r, WY + r, WDX + r, WDY + r, WIL + r, d2s, us);
                d2min = d2s[0]; ubest = us[0]; kbest = 0;
                for (int64_t a = 1; a < A; a++)
                    if (d2s[a] < d2min) { d2min = d2s[a]; kbest = a; ubest = us[a]; }
            } else for (int64_t a = 0; a < A; a++) {
                int64_t jj = j - back + a;
                jj = jj < 0 ? 0 : (jj > nseg - 1 ? nseg - 1 : jj);
                int64_t r = base + jj;
                float rx = x - WX[r], ry = y - WY[r];
                float u = rx * WDX[r];
                u = u + ry * WDY[r];
                u = u * WIL[r];
                u = u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);
                float ex = rx - u * WDX[r], ey = ry - u * WDY[r];
                float d2 = ex * ex;
                d2 = d2 + ey * ey;
                if (kbest < 0 || d2 < d2min) { d2min = d2; kbest = a; ubest = u; }
            }
            j = j + kbest - back;
            j = j < 0 ? 0 : (j > nseg - 1 ? nseg - 1 : j);
            int64_t r = base + j;
            int64_t o = h * Q + q;
            dist[o] = sqrtf(d2min);
            s[o] = cum[r] + ubest * len[r];
            rc[o] = ucos[r];
            rs[o] = usin[r];
        }
    }
}
"""

_LIB: ctypes.CDLL | None = None
_TRIED = False
_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "craft"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc / gcc, or set $CC)")
    # no fused multiply-adds (the tensor code's rounding); no errno / FP-trap semantics (neither changes a
    # value, both let the compiler vectorise the pair loop)
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    key = hashlib.sha256((_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"proxy_native_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as d:
            src = Path(d) / "proxy_native.c"
            src.write_text(_SOURCE)
            tmp = Path(d) / out.name
            r = subprocess.run([cc, *flags, "-o", str(tmp), str(src), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            os.replace(tmp, out)  # atomic: a concurrent build by another worker is harmless
    lib = ctypes.CDLL(str(out))
    lib.lane_query.restype = ctypes.c_int
    lib.lane_query.argtypes = [_I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _F, _I, _P, _P, _P, _P, _P, _F, _F,
                               _P, _P, _P, _P, _P]
    lib.red_light_runs.restype = None
    lib.red_light_runs.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _F, _P]
    lib.stop_violations.restype = None
    lib.stop_violations.argtypes = [_I, _I, _I] + [_P] * 12 + [_F, _P]
    lib.route_track.restype = None
    lib.route_track.argtypes = [_I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, once per machine), or None with one stderr line if they
    cannot be built."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            _LIB = _build()
        except Exception as e:  # noqa: BLE001 - any build failure falls back to the tensor code
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"craft: the proxy's native kernels could not be built ({msg}); using the tensor code",
                  file=sys.stderr)
    return _LIB


def _ptr(x: Tensor) -> int:
    return x.data_ptr()


def _feat16(index) -> Tensor:
    """The lane index's segment table as (S + 1, 16) float32 rows (64 bytes each), made once per index."""
    f = getattr(index, "_feat16", None)
    if f is None:
        f = torch.zeros(index.feat.shape[0], 16, dtype=torch.float32)
        f[:, :index.feat.shape[1]] = index.feat.cpu()
        index._feat16 = f
    return f


def lane_query(lib: ctypes.CDLL, index, map_b: Tensor, group: int, pos: Tensor, cos: Tensor, sin: Tensor,
               cos_wrong: float, cap: float) -> dict[str, Tensor]:
    """:meth:`~craft.finetune.proxy._LaneIndex.query` of ``index`` at points ``pos (Q, 2)`` with ``cos, sin (Q,)``
    of their headings; point i lies on map ``map_b[(i // group) % len(map_b)]``. Returns the (Q,) outputs."""
    Q = pos.shape[0]
    pos = pos.contiguous()
    px, py = pos[:, 0].contiguous(), pos[:, 1].contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    map_b = map_b.to(torch.int64).contiguous()
    out = {"offroad": torch.empty(Q, dtype=torch.bool), "opposite": torch.empty(Q, dtype=torch.bool),
           "emergency": torch.empty(Q, dtype=torch.bool), "center_dist": torch.empty(Q),
           "lane": torch.empty(Q, dtype=torch.int64)}
    if index.start.shape[0] >= 2**32 or Q >= 2**31:
        raise CraftError("the native lane query handles < 2^32 grid cells and < 2^31 points per call")
    if Q:
        rc = lib.lane_query(Q, _ptr(px), _ptr(py), _ptr(cos), _ptr(sin), _ptr(map_b), group, map_b.shape[0],
                       _ptr(index.origin), _ptr(index.shape), _ptr(index.cell_offset), index.cell,
                       index.start.shape[0], _ptr(index.start), _ptr(index.count), _ptr(index.items),
                       _ptr(_feat16(index)), _ptr(index.lane), cos_wrong, cap,
                       _ptr(out["offroad"]), _ptr(out["opposite"]), _ptr(out["emergency"]),
                       _ptr(out["center_dist"]), _ptr(out["lane"]))
        if rc != 0:
            raise MemoryError("the native lane query could not allocate its work buffers")
    return out


def route_track(lib: ctypes.CDLL, route, pos: Tensor, b: Tensor, j0: Tensor, back: int, ahead: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The route tracking of :meth:`~craft.finetune.proxy._Route.tracker` over all ``H`` steps at once.

    pos: (H, Q, 2) the egos after each step; b: (Q,) state of each candidate; j0: (Q,) the snapshot's
    projection segment. Returns ``dist, s, cos, sin``, each (H, Q)."""
    H, Q = pos.shape[:2]
    pos, b, j0 = pos.contiguous(), b.to(torch.int64).contiguous(), j0.to(torch.int64).contiguous()
    win = route.win.contiguous()
    cum, length, cos, sin = (x.contiguous() for x in route.out)
    outs = tuple(torch.empty(H, Q) for _ in range(4))
    if H and Q:
        lib.route_track(H, Q, _ptr(pos), _ptr(b), _ptr(j0), _ptr(win), win.shape[1], route.nseg, back,
                        back + ahead + 1, _ptr(cum), _ptr(length), _ptr(cos), _ptr(sin), *(_ptr(x) for x in outs))
    return outs


def red_light_runs(lib: ctypes.CDLL, pos: Tensor, cy: Tensor, sy: Tensor, half: Tensor, rear0: Tensor, cur: Tensor,
                   ctrl: Tensor, lights: dict[str, Tensor], radius: float) -> Tensor:
    """The red-light rule of :func:`craft.finetune.proxy_kernels.red_light_runs` (same arguments and result:
    (H, Qs) bool) as one C loop per (candidate, light)."""
    H, Qs = cy.shape
    n = lights["ok"].shape[1]
    c = lambda x, dt=torch.float32: x.to(dt).contiguous()
    lux, luy = torch.cos(lights["heading"]), torch.sin(lights["heading"])
    run = torch.empty(H, Qs, dtype=torch.bool)
    if H and Qs and n:
        keep = (pos, cy, sy, half, rear0, c(cur, torch.int64), c(ctrl, torch.int64), c(lux), c(luy),
                c(lights["pos"][..., 0]), c(lights["pos"][..., 1]), c(lights["lane"], torch.int64),
                c(lights["k"], torch.int64), c(lights["ok"], torch.bool), c(lights["half_width"]))
        keep = tuple(x.contiguous() for x in keep)
        lib.red_light_runs(H, Qs, n, *(_ptr(x) for x in keep), radius, _ptr(run))
    else:
        run.zero_()
    return run


def stop_violations(lib: ctypes.CDLL, pos: Tensor, cy: Tensor, sy: Tensor, speed: Tensor, trig: Tensor, bux: Tensor,
                    buy: Tensor, hc: Tensor, hs: Tensor, ok: Tensor, inside0: Tensor, served0: Tensor,
                    stop_speed: float) -> Tensor:
    """The stop-sign rule of the proxy (:func:`craft.finetune.proxy_kernels.stop_sign_violations`) as one C
    loop per (candidate, sign). pos: (H, Qs, 2); cy, sy, speed: (H, Qs); trig: (Qs, n, 5); bux, buy, hc, hs,
    ok, inside0, served0: (Qs, n). Returns (H, Qs) bool, a violation of any sign at each step."""
    H, Qs = cy.shape
    n = ok.shape[1]
    viol = torch.zeros(H, Qs, dtype=torch.bool)
    if H and Qs and n:
        f = lambda x: x.to(torch.float32).contiguous()
        b = lambda x: x.to(torch.bool).contiguous()
        keep = (f(pos), f(cy), f(sy), f(speed), f(trig), f(bux), f(buy), f(hc), f(hs), b(ok), b(inside0), b(served0))
        lib.stop_violations(H, Qs, n, *(_ptr(x) for x in keep), stop_speed, _ptr(viol))
    return viol

"""Native CPU kernels of the counterfactual world: the lane query and the route tracking as plain C loops.

The eager lane query (:meth:`craft.finetune.proxy._LaneIndex.query`) sorts the ``H * B * G`` points by
grid cell, copies every (point, segment) pair's features and runs some forty tensor ops per pair; the
route tracking runs a dozen ops per step on ``(window, candidate)`` blocks. The same rules written as one
loop per point (lane) and per candidate (route) need no sort, no copies and no temporaries: each point
reads its cell's segment list in place and keeps its running picks in registers. Here they are, in C,
compiled once per machine with the system C compiler (``cc``, or ``$CC``) into a shared library cached
under ``$XDG_CACHE_HOME/craft`` (``~/.cache/craft``; written to a temporary name and renamed), and called
through :mod:`ctypes` on the tensors' memory (CPU, contiguous, float32 / int64).

The loops apply the same float32 operations in the same order as the tensor code (no fused multiply-adds:
``-ffp-contract=off``) and the same first-index tie rule, so they give the eager path's results (the tests
compare them on varied states). Used when ``CounterfactualWorld(..., compile=True)`` and the tensors are
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

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define FAR 1e30f

/* The proxy's lane rules at Q points (craft/finetune/proxy.py, _LaneIndex.query and lane_pairs).
   Point i lies on map mb[(i / group) % nb]. feat: (S1, 16) float32, one 64-byte row per segment of the
   segment table (AX AY DX DY IL2 HW2 REACH CH SH TLO THI JUNCTION SHOULDER EDGE_REACH HW, pad), so a pair
   reads one cache line; lane_of: (S1,) lane of each segment; grid: origin (M, 2), shape (M, 2), cell_offset (M,), start / count (cells,), items.
   Outputs (Q,): offroad, opposite, emergency (0 / 1), center, lane. */
void lane_query(int64_t Q, const float *px, const float *py, const float *cy, const float *sy,
                const int64_t *mb, int64_t group, int64_t nb,
                const float *origin, const int64_t *shape, const int64_t *cell_offset, float cell, int64_t ncells,
                const int64_t *start, const int64_t *count, const int64_t *items,
                const float *feat, const int64_t *lane_of, float cos_wrong, float cap,
                uint8_t *offroad, uint8_t *opposite, uint8_t *emergency, float *center, int64_t *lane)
{
    int64_t gi = 0, bi = 0;  /* i = (. * nb + bi) * group + gi, without divisions */
    for (int64_t i = 0; i < Q; i++, gi++) {
        if (gi == group) { gi = 0; if (++bi == nb) bi = 0; }
        int64_t m = mb[bi];
        float fx = (px[i] - origin[2 * m]) / cell;
        float fy = (py[i] - origin[2 * m + 1]) / cell;
        offroad[i] = 1; opposite[i] = 0; emergency[i] = 0; center[i] = cap; lane[i] = -1;
        /* floor(f) >= 0 iff f >= 0, and floor(f) < n iff f < n for an integer n; NaN fails both */
        if (!(fx >= 0.0f && fy >= 0.0f && fx < (float)shape[2 * m] && fy < (float)shape[2 * m + 1]))
            continue;  /* outside the map's grid: off-road, no lane */
        int64_t cid = cell_offset[m] + (int64_t)fx * shape[2 * m + 1] + (int64_t)fy;  /* truncation = floor here */
        if (cid < 0 || cid >= ncells)
            continue;
        int64_t K = count[cid];
        const int64_t *it = items + start[cid];
        float x = px[i], y = py[i], c = cy[i], s = sy[i];
        int on = 0;
        /* running first minima (strict <); every pick value is finite, so k = 0 always takes them */
        float dmin = INFINITY, cbest = INFINITY, dbest = 0.0f, emin = INFINITY;
        int64_t near = 0, best = 0, eseg = 0;
        for (int64_t k = 0; k < K; k++) {
            int64_t g = it[k];
            const float *f = feat + 16 * g;
            float dx = f[2], dy = f[3];
            float rx = x - f[0], ry = y - f[1];
            float t = rx * dx;
            t = t + ry * dy;
            t = t * f[4];
            float u = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
            float ex = rx - u * dx, ey = ry - u * dy;
            float d2 = ex * ex;
            d2 = d2 + ey * ey;
            on |= (t > f[9]) & (t < f[10]) & (d2 <= f[5]);
            float d = sqrtf(d2);
            float cand = d > f[6] ? FAR + d : d;
            int lt = cand < dmin;
            dmin = lt ? cand : dmin;
            near = lt ? g : near;
            float cosd = c * f[7];
            cosd = cosd + s * f[8];
            float cost = cand + (-2.0f) * cosd;
            int lb = cost < cbest;
            cbest = lb ? cost : cbest;
            best = lb ? g : best;
            dbest = lb ? d : dbest;
            float ec = d > f[13] ? FAR + d : d;
            int le = ec < emin;
            emin = le ? ec : emin;
            eseg = le ? g : eseg;
        }
        offroad[i] = !on;
        if (K > 0 && dmin < 0.5f * FAR) {
            const float *f = feat + 16 * near;
            float cn = c * f[7] + s * f[8];
            opposite[i] = cn < cos_wrong && !(f[11] > 0.0f);
            center[i] = dbest;
            lane[i] = lane_of[best];
        }
        if (K > 0 && emin < 0.5f * FAR && feat[16 * eseg + 12] > 0.0f && emin <= feat[16 * eseg + 14])
            emergency[i] = 1;
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
            for (int64_t a = 0; a < A; a++) {
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
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
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
    lib.lane_query.restype = None
    lib.lane_query.argtypes = [_I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _F, _I, _P, _P, _P, _P, _P, _F, _F,
                               _P, _P, _P, _P, _P]
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
    if Q:
        lib.lane_query(Q, _ptr(px), _ptr(py), _ptr(cos), _ptr(sin), _ptr(map_b), group, map_b.shape[0],
                       _ptr(index.origin), _ptr(index.shape), _ptr(index.cell_offset), index.cell,
                       index.start.shape[0], _ptr(index.start), _ptr(index.count), _ptr(index.items),
                       _ptr(_feat16(index)), _ptr(index.lane), cos_wrong, cap,
                       _ptr(out["offroad"]), _ptr(out["opposite"]), _ptr(out["emergency"]),
                       _ptr(out["center_dist"]), _ptr(out["lane"]))
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

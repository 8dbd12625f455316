"""Deterministic synthetic pelvis phantoms in the HipMRI 2D-slice layout.

The real HipMRI prostate study is not redistributable, so tests, demos and CI
train on these phantoms instead. Each slice is an axial T2-weighted-looking
cross-section of a male pelvis with the same file layout, shapes, dtypes and
label set as the real ``keras_slices_*`` data:

* array axis 0 (256 px) runs patient right -> left,
* array axis 1 (128 or 144 px) runs anterior -> posterior,
* slice index Z runs inferior (prostate apex) -> superior (bladder dome),
* labels: 0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate.

Display a slice the way a radiologist reads it with ``image.T`` (anterior up,
patient right on the viewer's left); :func:`save_phantom_figure` does that.

Only numpy, scipy.ndimage and nibabel (through bundle.utils) are needed; matplotlib is imported lazily
by the figure helper alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from bundle.engine.io import nifti_gz_bytes

__all__ = [
    "GENERATOR_VERSION",
    "HEIGHT",
    "LABELS",
    "SPLITS",
    "case_layout",
    "phantom_slice",
    "save_phantom_figure",
    "write_hipmri_phantoms",
]

# Bump whenever the pixels change, so stale data sets on disk are regenerated.
GENERATOR_VERSION = "1.1"
HEIGHT = 256
LABELS = {"background": 0, "body": 1, "bone": 2, "bladder": 3, "rectum": 4, "prostate": 5}
SPLITS = ("train", "validate", "test")
# Fixed id ranges per split keep ids disjoint and keep every existing case
# byte-identical when another split grows.
_SPLIT_ID_RANGE = {"train": (1, 600), "validate": (601, 800), "test": (801, 999)}
_META_FILE = "phantom.json"


def _rng(seed: int, case_id: int, *stream: int) -> np.random.Generator:
    # Keyed by (seed, case, stream) rather than drawn in sequence, so a case's
    # pixels never depend on which other cases or slices were generated.
    return np.random.default_rng([seed, case_id, *stream])


def _soft(d: np.ndarray, w: float = 0.7) -> np.ndarray:
    """Partial-volume membership from a signed distance (px, negative inside)."""
    return 0.5 - 0.5 * np.tanh(d / (2.0 * w))


def _ellipse_sdf(x, y, cx, cy, rx, ry, angle=0.0, p=2.0):
    """Approximate signed distance in px to a rotated (super)ellipse.

    First-order estimate (level-set value over its gradient): exact on the
    boundary, which is all the soft edges and hard labels need.
    """
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    ax, ay = np.abs(dx) / rx + 1e-6, np.abs(dy) / ry + 1e-6
    if p == 2.0:  # fast path: avoids float powers, the bulk of the cost
        rho = np.sqrt(ax * ax + ay * ay)
        return (rho - 1.0) * rho / np.hypot(ax / rx, ay / ry)
    rho = (ax**p + ay**p) ** (1.0 / p)
    grad = rho ** (1.0 - p) * np.hypot(ax ** (p - 1.0) / rx, ay ** (p - 1.0) / ry)
    return (rho - 1.0) / np.maximum(grad, 1e-6)


def _capsule_sdf(x, y, x0, y0, x1, y1, r):
    """Exact signed distance to a rounded segment; models elongated bones."""
    bx, by = x1 - x0, y1 - y0
    h = np.clip(((x - x0) * bx + (y - y0) * by) / (bx * bx + by * by + 1e-9), 0.0, 1.0)
    return np.hypot(x - x0 - h * bx, y - y0 - h * by) - r


def _bump(t: float, centre: float, half: float) -> float:
    """Cross-section radius factor of a sphere-like organ at slice position t."""
    q = (t - centre) / half
    return math.sqrt(max(0.0, 1.0 - q * q))


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation."""
    f = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return f / (f.std() + 1e-6)


# (u, v, rx, ry, angle, t_from, t_to) per muscle, mirrored left/right; u, v
# and radii are fractions of the body semi-axes (v > 0 is posterior).
_MUSCLES = [
    (0.52, 0.62, 0.36, 0.40, 0.55, -0.3, 1.3),   # gluteus maximus
    (0.80, 0.05, 0.16, 0.45, 0.20, 0.45, 1.4),   # gluteus medius / minimus
    (0.78, -0.35, 0.10, 0.22, -0.3, -0.3, 0.9),  # tensor fasciae latae / sartorius
    (0.47, -0.50, 0.13, 0.22, 0.4, 0.2, 1.4),    # iliopsoas
    (0.32, 0.10, 0.07, 0.40, -0.15, -0.1, 1.0),  # obturator internus
    (0.30, -0.45, 0.18, 0.25, -0.2, -0.4, 0.35), # adductors / obturator externus
    (0.12, -0.86, 0.10, 0.12, 0.0, 0.3, 1.4),    # rectus abdominis
]


@functools.lru_cache(maxsize=8)
def _case_fields(case_id: int, seed: int, width: int) -> tuple[np.ndarray, ...]:
    """Slow smooth fields shared by all slices of a case (cached: slices come case by case)."""
    r = _rng(seed, case_id, 3)
    shape = (HEIGHT, width)
    fields = tuple(_noise(r, shape, sigma) for sigma in (10.0, 10.0, 12.0, 6.0))
    for f in fields:
        f.flags.writeable = False
    return fields


def _case_params(case_id: int, seed: int) -> dict:
    """Draws the per-case anatomy; everything slice-dependent is derived from it."""
    r = _rng(seed, case_id, 0)
    u = r.uniform
    return {
        "cx": HEIGHT / 2 + r.normal(0, 3), "cy": u(0.47, 0.53),
        "a": u(0.40, 0.45) * HEIGHT, "b": u(0.40, 0.46), "p": u(2.5, 3.1),
        "harm": [(u(-0.03, 0.03), u(0, 2 * math.pi)) for _ in range(3)],
        "fat": u(0.07, 0.17), "cleft": u(0.06, 0.14), "septa": u(0.1, 0.35),
        "fat_harm": [(u(-0.2, 0.2), u(0, 2 * math.pi)) for _ in range(4)],
        "muscle_gain": [u(0.88, 1.12) for _ in _MUSCLES],
        "zshift": u(-0.12, 0.12), "gain": math.exp(r.normal(0, 0.3)), "sigma": u(10, 28),
        "I": {"fat": u(900, 1150), "muscle": u(260, 380), "urine": u(1500, 2300),
              "marrow_rel": u(0.8, 0.95), "cortex": u(40, 90), "cg": u(430, 600), "pz": u(750, 1050),
              "rwall": u(200, 300), "rcont": u(350, 700), "sv": u(1000, 1400)},
        "pelvic_fat": u(0.8, 1.1),
        "blad_rx": u(0.09, 0.17) * HEIGHT, "blad_ratio": u(0.55, 0.8), "blad_on": u(0.3, 0.5),
        "blad_v": u(-0.45, -0.3), "blad_p": u(1.9, 2.3),
        "pro_rx": u(12, 18), "pro_ratio": u(0.7, 0.9), "pro_c": u(0.12, 0.28), "pro_h": u(0.2, 0.3),
        "rec_rx": u(10, 15), "rec_ry": u(8, 12), "rec_v": u(0.3, 0.42), "gas": u(0.8, 2.5),
        "fem_r": u(14, 18), "fem_u": u(0.56, 0.64), "fem_v": u(-0.1, 0.05), "fem_c": u(0.45, 0.6),
        "fem_h": u(0.2, 0.28), "tilt": r.normal(0, 0.03),
        "bias": [r.normal(0, 0.12) for _ in range(3)], "coil": u(0.15, 0.4),
    }


def case_layout(case_id: int, seed: int = 0) -> tuple[int, int]:
    """Width and week number that the writer uses for a case.

    Args:
        case_id: Case number (0-999).
        seed: Data-set seed.

    Returns:
        ``(width, week)``: width is 128 or 144 (about a third are 144), week 0-2.
    """
    r = _rng(seed, case_id, 2)
    return (144 if r.random() < 1 / 3 else 128), int(r.integers(0, 3))


def phantom_slice(case_id: int, slice_idx: int, num_slices: int = 16, width: int = 128,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Renders one axial slice of a synthetic male pelvis.

    Args:
        case_id: Case (patient) number; selects the anatomy.
        slice_idx: Slice position, 0 = most inferior, ``num_slices - 1`` = most superior.
        num_slices: Number of slices the case is sampled at (spans the whole pelvis).
        width: Anterior-posterior size of the array (128 or 144 in the real data).
        seed: Data-set seed.

    Returns:
        (image float32 [256, width] raw MR-like intensities,
         mask uint8 [256, width] labels 0-5).
    """
    if not 0 <= slice_idx < num_slices:
        raise ValueError(f"slice_idx {slice_idx} outside [0, {num_slices})")
    if min(case_id, seed) < 0 or width < 32:
        raise ValueError("case_id and seed must be >= 0 and width >= 32")
    P = _case_params(case_id, seed)
    I = dict(P["I"], marrow=P["I"]["marrow_rel"] * P["I"]["fat"])  # fatty marrow tracks fat
    t = slice_idx / (num_slices - 1) if num_slices > 1 else 0.5
    tb = t + P["zshift"]  # bone/prostate levels differ between patients
    rs = _rng(seed, case_id, 1, slice_idx)
    shape = (HEIGHT, width)
    x, y = np.meshgrid(np.arange(HEIGHT, dtype=np.float32), np.arange(width, dtype=np.float32),
                       indexing="ij")
    # A smooth per-case deformation of the coordinates makes every outline
    # organic rather than geometric, and stays coherent from slice to slice.
    warp_x, warp_y, patchy, plane_w = _case_fields(case_id, seed, width)
    x = x + 2.5 * warp_x
    y = y + 2.5 * warp_y

    img = np.zeros(shape, np.float32)
    amp = np.zeros(shape, np.float32)   # texture strength per tissue
    lab = np.zeros(shape, np.uint8)

    def paint(m, value, tex, label=None, hard=None):
        # Painter's algorithm with soft masks gives partial-volume edges; the
        # label follows the same order so image and mask always agree.
        img[...] = img * (1 - m) + value * m
        amp[...] = amp * (1 - m) + tex * m
        if label is not None:
            lab[hard if hard is not None else m > 0.5] = label

    # Body outline: a boxy superellipse with per-case lobes, hips widest near
    # the femoral heads, and a gluteal cleft that deepens inferiorly.
    a = P["a"] * (1 + 0.04 * math.exp(-((tb - 0.5) / 0.3) ** 2))
    b, cx, cy = P["b"] * width, P["cx"], P["cy"] * width
    du, dv = (x - cx) / a, (y - cy) / b
    theta = np.arctan2(dv, du)
    rho = (np.abs(du) ** P["p"] + np.abs(dv) ** P["p"]) ** (1 / P["p"])
    lobes = 1 + sum(c * np.cos((k + 2) * theta + ph) for k, (c, ph) in enumerate(P["harm"]))
    cleft = 1 + P["cleft"] * (1.3 - t) * np.exp(-(((theta - math.pi / 2) / 0.07) ** 2))
    rho = rho * cleft / lobes
    r = np.hypot(x - cx, y - cy)
    d_body = r * (1 - 1 / np.maximum(rho, 1e-3))  # radial distance to the outline
    paint(_soft(d_body), I["fat"], 0.06, 1, d_body < 0)
    # Subcutaneous fat is thicker over the buttocks and lower abdomen.
    sin_t = np.sin(theta)
    fat_px = P["fat"] * b * (1 + 0.7 * np.clip(sin_t, 0, None) + 0.3 * np.clip(-sin_t, 0, None))
    fat_px *= 1 + sum(c * np.cos((k + 3) * theta + ph) for k, (c, ph) in enumerate(P["fat_harm"]))
    inner = _soft(d_body + fat_px, 1.0)
    paint(inner, I["muscle"], 0.07)
    # Muscles as a partition of the inner body: each pixel belongs to the
    # nearest muscle ellipse, and thin fat planes run where two are equally
    # near, which is how intermuscular planes look on a real slice.
    near1 = np.full(shape, np.inf, np.float32)  # distance to the nearest muscle
    near2 = near1.copy()                         # ... and to the second nearest
    own = np.ones(shape, np.float32)             # intensity factor of the nearest
    for (mu, mv, mrx, mry, ang, lo, hi), gain in zip(_MUSCLES, P["muscle_gain"]):
        w = _bump(tb, (lo + hi) / 2, (hi - lo) / 2)
        for s in (-1, 1) if w > 0 else ():
            d = _ellipse_sdf(x, y, cx + s * mu * a, cy + mv * b, mrx * a * (0.6 + 0.4 * w),
                             mry * b * (0.6 + 0.4 * w), angle=s * ang)
            near2 = np.minimum(near2, np.maximum(near1, d))
            own = np.where(d < near1, np.float32(gain * (1 + 0.03 * s)), own)
            near1 = np.minimum(near1, d)
    paint(inner, I["muscle"] * own, 0.07)
    paint(inner * 0.8 * np.exp(-(((near2 - near1) / np.maximum(1.2 + 0.4 * plane_w, 0.6)) ** 2)),
          I["fat"], 0.06)
    # Faint fat septa inside muscle bellies, patchy like real marbling.
    septa = np.exp(-((_noise(rs, shape, 4.0) / 0.1) ** 2))
    septa *= P["septa"] * np.clip(patchy, 0, 1)
    paint(septa * inner, I["fat"], 0.06)

    # Intrapelvic fat; the levator sling narrows it towards the apex.
    ru = (0.22 + 0.16 * min(max(t, 0), 1)) * a * P["pelvic_fat"]
    paint(_soft(_ellipse_sdf(x, y, cx, cy + 0.05 * b, ru, 0.62 * b, p=2.4), 1.2), I["fat"], 0.05)
    isa = _bump(tb, 0.1, 0.4)
    for s in (-1, 1) if isa > 0 else ():  # ischioanal fossae beside the anorectum
        dfo = _ellipse_sdf(x, y, cx + s * 0.2 * a, cy + 0.42 * b, 0.12 * a * isa, 0.3 * b * isa,
                           angle=-s * 0.6)
        paint(_soft(dfo, 1.2), I["fat"], 0.05)

    # Midline organs are placed relative to each other so they abut but never overlap.
    y_rec = cy + P["rec_v"] * b + 0.05 * b * t
    pro_f = _bump(tb, P["pro_c"], P["pro_h"])
    pro_rx, pro_ry = P["pro_rx"] * pro_f, P["pro_rx"] * P["pro_ratio"] * pro_f
    y_pro = y_rec - P["rec_ry"] - pro_ry - 3
    y_sym = y_rec - P["rec_ry"] - 2 * P["pro_rx"] * P["pro_ratio"] - 14
    s_lat = (-1, 1)

    # --- bones: pelvic ring (one union) and femora (another), each a dark cortex
    # shell around bright fatty marrow.
    fem_x = [cx + s * P["fem_u"] * a for s in s_lat]
    fem_y = cy + P["fem_v"] * b
    pel, fem = [], []
    for s, fx in zip(s_lat, fem_x):
        tc = P["fem_c"] + s * P["tilt"]
        rh = P["fem_r"] * _bump(tb, tc, P["fem_h"])
        ra = (P["fem_r"] + 6) * _bump(tb, tc + 0.06, P["fem_h"] + 0.06)
        if ra > 1:  # acetabulum covers the medial side of the head, fully at the roof
            cut = s * (x - fx) - 0.4 * rh - 3 * max(0.0, ra - rh - 6)
            pel.append(np.maximum(np.hypot(x - fx, y - fem_y) - ra, cut))
        if rh > 1:
            fem.append(np.hypot(x - fx, y - fem_y) - rh)
        fn = _bump(tb, tc - P["fem_h"] - 0.02, 0.14)
        if fn > 0:  # femoral neck and greater trochanter below the head
            fem.append(_capsule_sdf(x, y, fx, fem_y, fx + s * 22, fem_y + 8, 6 + 5 * fn))
        fs = min(1.0, max(0.0, (tc - P["fem_h"] - tb) / 0.1))
        if fs > 0:  # femoral shaft further down
            fem.append(np.hypot(x - fx - s * 18, y - fem_y - 4) - 11 * fs)
        isc = _bump(tb, 0.25, 0.35)
        if isc > 0:  # ischium: posterior column down to the tuberosity
            x0 = cx + s * 0.36 * a
            pel.append(_capsule_sdf(x, y, x0, fem_y + 6, x0 - s * 4, cy + 0.36 * b, 4 + 6 * isc))
        pub = _bump(tb, 0.2, 0.28)
        if pub > 0:  # pubic bones either side of the symphysis
            pel.append(_capsule_sdf(x, y, cx + s * 5, y_sym, cx + s * 0.17 * a, y_sym + 3, 4 + 4 * pub))
        ram = _bump(tb, 0.42, 0.12)
        if ram > 0:  # superior ramus running to the acetabulum
            pel.append(_capsule_sdf(x, y, cx + s * 6, y_sym, fx - s * 12, fem_y - 12, 4 + 4 * ram))
        il = min(1.0, max(0.0, (tb - 0.72) / 0.15))
        if il > 0:  # iliac bone above the acetabulum
            mx, my = (fx + cx + s * 0.3 * a) / 2, fem_y + 0.3 * b
            pel.append(_capsule_sdf(x, y, fx + s * 2, fem_y - 4, mx, my, 5 + 7 * il))
            pel.append(_capsule_sdf(x, y, mx, my, cx + s * 0.28 * a, cy + 0.55 * b, 3 + 4 * il))
    sac = min(1.0, max(0.0, (tb - 0.5) / 0.4))
    if sac > 0:  # coccyx widening into the sacrum behind the rectum
        ys = min(cy + 0.68 * b, y_rec + P["rec_ry"] + 10)
        pel.append(_ellipse_sdf(x, y, cx, ys + 3 + 3 * sac, 4 + 0.22 * a * sac, 3 + 5 * sac, p=2.5))
    for group in (pel, fem):
        if group:
            d = np.minimum.reduce(group) if len(group) > 1 else group[0]
            if group is fem:  # hyaline cartilage gap separates head from acetabulum
                paint(_soft(d - 1.8), 0.9 * I["cg"], 0.05)
            paint(_soft(d), I["cortex"], 0.1, 2, d < 0)
            paint(_soft(d + 2.0), I["marrow"], 0.05)

    # Femoral vessels: flow voids anteromedial to the hips.
    for s, fx in zip(s_lat, fem_x):
        for k, rv in ((0, 3.5), (1, 4.5)):
            vx, vy = fx - s * (6 + 8 * k), fem_y - P["fem_r"] - 8
            paint(_soft(np.hypot(x - vx, y - vy) - rv), 0.3 * I["muscle"], 0.05)

    # Levator ani: the muscular sling around the lower rectum and prostate.
    lev = _bump(tb, 0.1, 0.4)
    for s in (-1, 1) if lev > 0 else ():
        dl = _capsule_sdf(x, y, cx + s * (P["rec_rx"] + 4), y_rec + 4, cx + s * 0.3 * a,
                          cy - 0.05 * b, 1.5 + 1.5 * lev)
        paint(_soft(dl), 0.9 * I["muscle"], 0.07)

    # Mesorectal fat wrapped in its thin dark fascia.
    rrx, rry = P["rec_rx"], P["rec_ry"]
    paint(_soft(_ellipse_sdf(x, y, cx, y_rec, rrx + 9, rry + 8)), I["muscle"], 0.05)
    paint(_soft(_ellipse_sdf(x, y, cx, y_rec, rrx + 8, rry + 7)), I["fat"], 0.06)

    # Bladder: grows superiorly from the base (which sits on the prostate) and
    # drifts anteriorly as it fills.
    g = min(1.0, max(0.0, (t - P["blad_on"]) / 0.4)) ** 0.6
    if g > 0:
        brx = P["blad_rx"] * g + 4
        bry = min(brx * P["blad_ratio"], (y_rec - rry - 4 - (cy + P["blad_v"] * b)))
        y_bl = (1 - g) * y_pro + g * (cy + P["blad_v"] * b)
        db = _ellipse_sdf(x, y, cx, y_bl, brx, max(bry, 4), p=P["blad_p"])
        paint(_soft(db), 1.1 * I["muscle"], 0.05, 3, db < 0)
        paint(_soft(db + 2.0), I["urine"], 0.02)

    # Seminal vesicles: bright convoluted bow-tie above the prostate base.
    sv = _bump(tb, P["pro_c"] + P["pro_h"] + 0.05, 0.12)
    if sv > 0:
        for s in s_lat:
            dsv = _ellipse_sdf(x, y, cx + s * 14, y_rec - rry - 6, 13 * sv, 4 * sv + 1, angle=s * 0.35)
            paint(_soft(dsv), I["sv"], 0.12)

    # Prostate: dark capsule, bright peripheral zone, heterogeneous central gland.
    if pro_rx > 2:
        dp = _ellipse_sdf(x, y, cx, y_pro, pro_rx, pro_ry)
        paint(_soft(dp), 0.8 * I["muscle"], 0.05, 5, dp < 0)
        paint(_soft(dp + 1.3), I["pz"], 0.1)
        paint(_soft(_ellipse_sdf(x, y, cx, y_pro - 0.3 * pro_ry, 0.68 * pro_rx, 0.6 * pro_ry), 1.2),
              I["cg"], 0.18)

    # Rectum: dark muscular wall around mixed stool and gas.
    dr = _ellipse_sdf(x, y, cx, y_rec, rrx, rry)
    paint(_soft(dr), I["rwall"], 0.06, 4, dr < 0)
    lumen = _soft(dr + 3.0)
    paint(lumen, I["rcont"], 0.3)
    paint(lumen * _soft(P["gas"] - _noise(rs, shape, 3.0), 0.15), 0.0, 0.0)

    # Texture, smooth coil sensitivity (brighter posteriorly near the spine
    # coil), a light blur for partial volume, then Rician noise.
    img *= 1 + amp * _noise(rs, shape, 1.0)
    bu, bv = (x - cx) / HEIGHT, (y - cy) / width
    c0, c1, c2 = P["bias"]
    bias = np.exp(c0 * bu + c1 * bv + c2 * bu * bv + 0.05 * (t - 0.5))
    bias *= 1 + P["coil"] * (0.5 + bv) + 0.5 * P["coil"] * (bu * bu)
    img = gaussian_filter(img * bias * P["gain"], 0.6)
    re, im = rs.standard_normal((2, *shape), dtype=np.float32) * P["sigma"]
    img = np.sqrt((img + re) ** 2 + im**2)
    return img.astype(np.float32), lab


def _plan(train_cases, val_cases, test_cases, slices_per_case, seed, trailing_axis_every) -> dict:
    if slices_per_case < 1 or trailing_axis_every < 0 or seed < 0:
        raise ValueError("need slices_per_case >= 1, trailing_axis_every >= 0 and seed >= 0")
    counts = {"train": train_cases, "validate": val_cases, "test": test_cases}
    cases = {}
    for split, n in counts.items():
        lo, hi = _SPLIT_ID_RANGE[split]
        if not 0 <= n <= hi - lo + 1:
            raise ValueError(f"{split}: {n} cases, at most {hi - lo + 1} supported")
        cases[split] = list(range(lo, lo + n))
    return {"generator": "bundle.data.phantom", "version": GENERATOR_VERSION, "seed": seed,
            "slices_per_case": slices_per_case, "trailing_axis_every": trailing_axis_every,
            "cases": cases, "counts": {s: len(c) * slices_per_case for s, c in cases.items()}}


def _is_complete(out_dir: Path, plan: dict) -> bool:
    try:
        meta = json.loads((out_dir / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta != plan:
        return False
    return all(len(list((out_dir / f"keras_slices{sub}_{s}").glob("*.nii.gz"))) == n
               for s, n in plan["counts"].items() for sub in ("", "_seg"))


def write_hipmri_phantoms(out_dir, train_cases: int = 20, val_cases: int = 3, test_cases: int = 3,
                          slices_per_case: int = 16, seed: int = 0,
                          trailing_axis_every: int = 0) -> dict[str, int]:
    """Writes a phantom data set in the HipMRI ``keras_slices_*`` layout.

    Files are ``keras_slices_{split}/case_XXX_week_Y_slice_Z.nii.gz`` (float32)
    and ``keras_slices_seg_{split}/seg_XXX_week_Y_slice_Z.nii.gz`` (uint8), plus
    ``phantom.json`` recording version, seed, case ids and counts. Case ids come
    from fixed per-split ranges (train 1-600, validate 601-800, test 801-999),
    so they are disjoint and growing one split leaves the others unchanged.

    The set is built in a sibling temp dir and renamed into place, so a killed
    run never leaves a half-written set. A complete set with identical
    parameters is left untouched; one of ours with other parameters is
    replaced; a non-empty directory that is not ours raises FileExistsError.

    Args:
        out_dir: Destination dataset directory.
        train_cases: Number of training cases.
        val_cases: Number of validation cases.
        test_cases: Number of test cases.
        slices_per_case: Slices per case, spread evenly from inferior to superior.
        seed: Data-set seed; the same seed and arguments give byte-identical files.
        trailing_axis_every: If k > 0, every k-th image file (counting across all
            splits) is stored as (256, W, 1) like some real files; masks stay 2D.

    Returns:
        Number of image slices per split: ``{'train': n, 'validate': n, 'test': n}``.
    """
    out_dir = Path(out_dir)
    plan = _plan(train_cases, val_cases, test_cases, slices_per_case, seed, trailing_axis_every)
    if _is_complete(out_dir, plan):
        return dict(plan["counts"])
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _META_FILE).exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no {_META_FILE}; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the final set
        k = 0
        for split, ids in plan["cases"].items():
            img_dir, seg_dir = tmp / f"keras_slices_{split}", tmp / f"keras_slices_seg_{split}"
            img_dir.mkdir()
            seg_dir.mkdir()
            for cid in ids:
                width, week = case_layout(cid, seed)
                for z in range(slices_per_case):
                    image, mask = phantom_slice(cid, z, slices_per_case, width, seed)
                    k += 1
                    if trailing_axis_every > 0 and k % trailing_axis_every == 0:
                        image = image[..., None]
                    stem = f"{cid:03d}_week_{week}_slice_{z}.nii.gz"
                    (img_dir / f"case_{stem}").write_bytes(nifti_gz_bytes(image))
                    (seg_dir / f"seg_{stem}").write_bytes(nifti_gz_bytes(mask))
        # Written last: its presence inside out_dir marks a finished set.
        (tmp / _META_FILE).write_text(json.dumps(plan, indent=1) + "\n")
        if _is_complete(out_dir, plan):  # a concurrent writer finished first
            return dict(plan["counts"])
        old = None
        if out_dir.exists():
            old = out_dir.parent / f"{tmp.name}.old"
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir, plan):  # a concurrent writer may have won the race
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(plan["counts"])


def save_phantom_figure(path, seed: int = 0, num_slices: int = 16, n: int = 8) -> Path:
    """Saves a grid of phantom slices displayed like axial pelvic MRI.

    Each panel shows ``image.T`` (anterior up, patient right on the viewer's
    left) with a per-image window from 0 to the 99th percentile, so a full
    bladder saturates slightly as it does on a soft-tissue window.

    Args:
        path: Output PNG path.
        seed: Data-set seed.
        num_slices: Slices per case the positions are drawn from.
        n: Number of panels (different cases, spread over slice positions).

    Returns:
        The written path.
    """
    # Lazy, and via Figure rather than pyplot: the library must work without
    # matplotlib, and must not switch the caller's global backend.
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = 4
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.0 * cols, 2.45 * rows), facecolor="black")
    for i, ax in enumerate(np.atleast_1d(fig.subplots(rows, cols)).ravel()):
        ax.axis("off")
        if i >= n:
            continue
        cid = 1 + i
        width, _ = case_layout(cid, seed)
        z = round(i * (num_slices - 1) / max(n - 1, 1))
        image, _ = phantom_slice(cid, z, num_slices, width, seed)
        ax.imshow(image.T, cmap="gray", vmin=0, vmax=float(np.percentile(image, 99)),
                  interpolation="bilinear")
        ax.set_title(f"case {cid:03d} slice {z}/{num_slices - 1} ({width} px)", color="white",
                     fontsize=9)
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=110, facecolor="black")
    return path

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

A slice is painted back to front (body, fat rim, muscles, fat, bones, vessels,
organs) with soft masks for partial-volume edges, then given texture, a coil
bias field, a light blur and Rician noise. Only numpy, scipy.ndimage and
nibabel and Pillow (through bundle.engine.io) are needed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

from bundle.engine.io import nifti_gz_bytes, save_tiles, to_uint8

__all__ = [
    "GENERATOR_VERSION",
    "HEIGHT",
    "LABELS",
    "SPLITS",
    "DEMO_SUBDIR",
    "case_layout",
    "demo_data_dir",
    "phantom_slice",
    "save_phantom_figure",
    "write_demo_phantoms",
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
DEMO_SUBDIR = "data/phantom"
_SIDES = (-1, 1)  # patient right (smaller axis-0 index), patient left


# ---------------------------------------------------------------------------------------------------- shapes ---


def _rng(seed: int, case_id: int, *stream: int) -> np.random.Generator:
    """A generator keyed by (seed, case, stream), so a case's pixels never depend on which other cases or slices
    were generated before it."""
    return np.random.default_rng([seed, case_id, *stream])


def _soft(distance: np.ndarray, edge: float = 0.7) -> np.ndarray:
    """Partial-volume membership in [0, 1] from a signed distance (px, negative inside).

    Args:
        distance: signed distance to a boundary.
        edge: width of the blurred edge in px.

    Returns:
        1 deep inside, 0 far outside, 0.5 on the boundary.
    """
    return 0.5 - 0.5 * np.tanh(distance / (2.0 * edge))


def _ellipse_sdf(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, power: float = 2.0
) -> np.ndarray:
    """Approximate signed distance in px to a rotated (super)ellipse.

    A first-order estimate (level-set value over its gradient): exact on the boundary, which is all the soft
    edges and hard labels need.

    Args:
        x, y: pixel coordinates.
        cx, cy: centre.
        rx, ry: semi-axes before rotation.
        angle: rotation in radians.
        power: superellipse exponent; 2 is an ellipse, larger is boxier.

    Returns:
        Signed distance, negative inside.
    """
    dx, dy = x - cx, y - cy
    if angle:
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        dx, dy = cos_a * dx + sin_a * dy, -sin_a * dx + cos_a * dy
    nx, ny = np.abs(dx) / rx + 1e-6, np.abs(dy) / ry + 1e-6
    if power == 2.0:  # fast path: avoids float powers, the bulk of the cost
        rho = np.sqrt(nx * nx + ny * ny)
        return (rho - 1.0) * rho / np.hypot(nx / rx, ny / ry)
    rho = (nx**power + ny**power) ** (1.0 / power)
    grad = rho ** (1.0 - power) * np.hypot(nx ** (power - 1.0) / rx, ny ** (power - 1.0) / ry)
    return (rho - 1.0) / np.maximum(grad, 1e-6)


def _capsule_sdf(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float, radius: float) -> np.ndarray:
    """Exact signed distance to the segment (x0, y0)-(x1, y1) rounded by ``radius``; models elongated bones."""
    bx, by = x1 - x0, y1 - y0
    along = np.clip(((x - x0) * bx + (y - y0) * by) / (bx * bx + by * by + 1e-9), 0.0, 1.0)
    return np.hypot(x - x0 - along * bx, y - y0 - along * by) - radius


def _bump(level: float, centre: float, half: float) -> float:
    """Cross-section radius factor, in [0, 1], of a sphere-like organ centred at ``centre`` with half-extent
    ``half``, cut at slice level ``level``."""
    q = (level - centre) / half
    return math.sqrt(max(0.0, 1.0 - q * q))


def _ramp(level: float, start: float, length: float) -> float:
    """0 below ``start``, rising linearly to 1 over ``length``."""
    return min(1.0, max(0.0, (level - start) / length))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth periodic Gaussian random field with unit standard deviation and correlation length ``sigma`` px."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-6)


# ----------------------------------------------------------------------------------------------- per case ---


class _Muscle(NamedTuple):
    """A muscle, mirrored left and right: centre and semi-axes as fractions of the body semi-axes (v > 0 is
    posterior), rotation, and the slice levels it spans."""

    u: float
    v: float
    rx: float
    ry: float
    angle: float
    level_from: float
    level_to: float


_MUSCLES = (
    _Muscle(0.52, 0.62, 0.36, 0.40, 0.55, -0.3, 1.3),  # gluteus maximus
    _Muscle(0.80, 0.05, 0.16, 0.45, 0.20, 0.45, 1.4),  # gluteus medius / minimus
    _Muscle(0.78, -0.35, 0.10, 0.22, -0.3, -0.3, 0.9),  # tensor fasciae latae / sartorius
    _Muscle(0.47, -0.50, 0.13, 0.22, 0.4, 0.2, 1.4),  # iliopsoas
    _Muscle(0.32, 0.10, 0.07, 0.40, -0.15, -0.1, 1.0),  # obturator internus
    _Muscle(0.30, -0.45, 0.18, 0.25, -0.2, -0.4, 0.35),  # adductors / obturator externus
    _Muscle(0.12, -0.86, 0.10, 0.12, 0.0, 0.3, 1.4),  # rectus abdominis
)


@dataclass(frozen=True)
class _Tissue:
    """Mean T2 signal of each tissue, before bias field and scanner gain."""

    fat: float
    muscle: float
    urine: float
    marrow_to_fat: float
    cortex: float
    central_gland: float
    peripheral_zone: float
    rectal_wall: float
    rectal_content: float
    seminal_vesicle: float

    @property
    def marrow(self) -> float:
        """Fatty marrow tracks fat."""
        return self.marrow_to_fat * self.fat


@dataclass(frozen=True)
class _Anatomy:
    """One case's anatomy and acquisition; lengths in px or as fractions of the body semi-axes, levels in slice
    positions (0 = most inferior, 1 = most superior)."""

    centre_x: float
    centre_y_frac: float  # of the width
    body_rx: float  # left-right semi-axis at the hips
    body_ry_frac: float  # anterior-posterior semi-axis, fraction of the width
    outline_power: float  # superellipse exponent: how boxy the body is
    outline_lobes: tuple  # (amplitude, phase) of the outline's harmonics 2, 3, 4
    fat_rim: float  # subcutaneous fat thickness, fraction of body_ry
    gluteal_cleft: float
    septa: float  # strength of fat septa in muscle
    fat_rim_lobes: tuple  # (amplitude, phase) of the rim thickness' harmonics 3..6
    muscle_gain: tuple  # intensity factor per muscle of _MUSCLES
    level_shift: float  # bone and prostate levels differ between patients
    gain: float  # scanner gain
    noise_sigma: float
    tissue: _Tissue
    pelvic_fat: float  # width factor of the intrapelvic fat
    bladder_rx: float
    bladder_aspect: float
    bladder_onset: float  # slice position where the bladder base appears
    bladder_v: float  # final anterior-posterior offset, fraction of body_ry
    bladder_power: float
    prostate_rx: float
    prostate_aspect: float
    prostate_level: float
    prostate_half_extent: float
    rectum_rx: float
    rectum_ry: float
    rectum_v: float  # anterior-posterior offset, fraction of body_ry
    rectal_gas: float  # threshold: higher, less gas
    femoral_head_radius: float
    hip_u: float  # left-right offset of the hip joints, fraction of body_rx
    hip_v: float  # anterior-posterior offset of the hip joints, fraction of body_ry
    femoral_head_level: float
    femoral_head_half_extent: float
    pelvic_tilt: float  # level difference between the left and right femoral heads
    bias: tuple  # coefficients of the log bias field: left-right, anterior-posterior, cross term
    coil_gain: float  # extra posterior signal near the spine coil


@functools.lru_cache(maxsize=64)
def _case_anatomy(case_id: int, seed: int) -> _Anatomy:
    """Draws a case's anatomy; everything slice-dependent is derived from it.

    Keyword arguments are evaluated in order, so the draws below happen in the order they are written.
    """
    r = _rng(seed, case_id, 0)
    u = r.uniform
    return _Anatomy(
        centre_x=HEIGHT / 2 + r.normal(0, 3), centre_y_frac=u(0.47, 0.53),
        body_rx=u(0.40, 0.45) * HEIGHT, body_ry_frac=u(0.40, 0.46), outline_power=u(2.5, 3.1),
        outline_lobes=tuple((u(-0.03, 0.03), u(0, 2 * math.pi)) for _ in range(3)),
        fat_rim=u(0.07, 0.17), gluteal_cleft=u(0.06, 0.14), septa=u(0.1, 0.35),
        fat_rim_lobes=tuple((u(-0.2, 0.2), u(0, 2 * math.pi)) for _ in range(4)),
        muscle_gain=tuple(u(0.88, 1.12) for _ in _MUSCLES),
        level_shift=u(-0.12, 0.12), gain=math.exp(r.normal(0, 0.3)), noise_sigma=u(10, 28),
        tissue=_Tissue(
            fat=u(900, 1150), muscle=u(260, 380), urine=u(1500, 2300), marrow_to_fat=u(0.8, 0.95),
            cortex=u(40, 90), central_gland=u(430, 600), peripheral_zone=u(750, 1050), rectal_wall=u(200, 300),
            rectal_content=u(350, 700), seminal_vesicle=u(1000, 1400),
        ),
        pelvic_fat=u(0.8, 1.1),
        bladder_rx=u(0.09, 0.17) * HEIGHT, bladder_aspect=u(0.55, 0.8), bladder_onset=u(0.3, 0.5),
        bladder_v=u(-0.45, -0.3), bladder_power=u(1.9, 2.3),
        prostate_rx=u(12, 18), prostate_aspect=u(0.7, 0.9), prostate_level=u(0.12, 0.28),
        prostate_half_extent=u(0.2, 0.3),
        rectum_rx=u(10, 15), rectum_ry=u(8, 12), rectum_v=u(0.3, 0.42), rectal_gas=u(0.8, 2.5),
        femoral_head_radius=u(14, 18), hip_u=u(0.56, 0.64), hip_v=u(-0.1, 0.05), femoral_head_level=u(0.45, 0.6),
        femoral_head_half_extent=u(0.2, 0.28), pelvic_tilt=r.normal(0, 0.03),
        bias=tuple(r.normal(0, 0.12) for _ in range(3)), coil_gain=u(0.15, 0.4),
    )  # fmt: skip


class _CaseFields(NamedTuple):
    """Slow smooth fields shared by all slices of a case."""

    warp_x: np.ndarray  # coordinate deformation, px / 2.5
    warp_y: np.ndarray
    patchiness: np.ndarray  # where muscle septa show
    plane_width: np.ndarray  # width modulation of intermuscular fat planes


@functools.lru_cache(maxsize=8)
def _case_fields(case_id: int, seed: int, width: int) -> _CaseFields:
    """The case's smooth fields (cached: slices are rendered case by case)."""
    rng = _rng(seed, case_id, 3)
    fields = _CaseFields(*(_smooth_noise(rng, (HEIGHT, width), sigma) for sigma in (10.0, 10.0, 12.0, 6.0)))
    for field in fields:
        field.flags.writeable = False
    return fields


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


# ---------------------------------------------------------------------------------------------- per slice ---


@dataclass(frozen=True)
class _Frame:
    """The slice's coordinates and the body's frame of reference on it."""

    x: np.ndarray  # left-right pixel coordinate, smoothly warped per case
    y: np.ndarray  # anterior-posterior pixel coordinate, smoothly warped per case
    position: float  # slice position, 0 = most inferior, 1 = most superior
    level: float  # position shifted by the case's bone/prostate level
    cx: float  # body centre
    cy: float
    body_rx: float  # body semi-axes on this slice
    body_ry: float


@dataclass(frozen=True)
class _Midline:
    """Midline organs placed relative to each other so they abut but never overlap."""

    rectum_y: float
    prostate_rx: float  # 0 where the slice misses the prostate
    prostate_ry: float
    prostate_y: float
    symphysis_y: float


class _Canvas:
    """Image, texture-strength and label maps, painted back to front."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.image = np.zeros(shape, np.float32)
        self.texture = np.zeros(shape, np.float32)
        self.labels = np.zeros(shape, np.uint8)

    def paint(
        self,
        membership: np.ndarray,
        value: float | np.ndarray,
        texture: float,
        label: int | None = None,
        inside: np.ndarray | None = None,
    ) -> None:
        """Blends a tissue over what is painted so far.

        Soft masks give partial-volume edges; the label follows the same order, so image and mask always agree.

        Args:
            membership: soft mask in [0, 1].
            value: tissue signal (a number or a map).
            texture: strength of the multiplicative texture in this tissue.
            label: label to write, if any.
            inside: where to write it; default ``membership > 0.5``.
        """
        self.image[...] = self.image * (1 - membership) + value * membership
        self.texture[...] = self.texture * (1 - membership) + texture * membership
        if label is not None:
            self.labels[inside if inside is not None else membership > 0.5] = label


def _slice_frame(anatomy: _Anatomy, fields: _CaseFields, slice_idx: int, num_slices: int, width: int) -> _Frame:
    """Warped coordinates, slice level and body axes of one slice.

    A smooth per-case deformation of the coordinates makes every outline organic rather than geometric, and
    stays coherent from slice to slice. The hips are widest near the femoral heads.
    """
    x, y = np.meshgrid(np.arange(HEIGHT, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    position = slice_idx / (num_slices - 1) if num_slices > 1 else 0.5
    level = position + anatomy.level_shift
    return _Frame(
        x=x + 2.5 * fields.warp_x,
        y=y + 2.5 * fields.warp_y,
        position=position,
        level=level,
        cx=anatomy.centre_x,
        cy=anatomy.centre_y_frac * width,
        body_rx=anatomy.body_rx * (1 + 0.04 * math.exp(-(((level - 0.5) / 0.3) ** 2))),
        body_ry=anatomy.body_ry_frac * width,
    )


def _midline(frame: _Frame, anatomy: _Anatomy) -> _Midline:
    """Rectum, prostate and pubic symphysis positions on this slice."""
    rectum_y = frame.cy + anatomy.rectum_v * frame.body_ry + 0.05 * frame.body_ry * frame.position
    size = _bump(frame.level, anatomy.prostate_level, anatomy.prostate_half_extent)
    prostate_rx, prostate_ry = anatomy.prostate_rx * size, anatomy.prostate_rx * anatomy.prostate_aspect * size
    return _Midline(
        rectum_y=rectum_y,
        prostate_rx=prostate_rx,
        prostate_ry=prostate_ry,
        prostate_y=rectum_y - anatomy.rectum_ry - prostate_ry - 3,
        symphysis_y=rectum_y - anatomy.rectum_ry - 2 * anatomy.prostate_rx * anatomy.prostate_aspect - 14,
    )


def _paint_body_outline(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Paints the body (fat signal, label 1): a boxy superellipse with per-case lobes and a gluteal cleft that
    deepens inferiorly.

    Returns:
        ``(distance, angle)``: signed radial distance to the outline (px) and each pixel's polar angle about the
        body centre (pi/2 points posterior).
    """
    x, y, cx, cy = frame.x, frame.y, frame.cx, frame.cy
    du, dv = (x - cx) / frame.body_rx, (y - cy) / frame.body_ry
    angle = np.arctan2(dv, du)
    power = anatomy.outline_power
    rho = (np.abs(du) ** power + np.abs(dv) ** power) ** (1 / power)
    lobes = 1 + sum(amp * np.cos((k + 2) * angle + phase) for k, (amp, phase) in enumerate(anatomy.outline_lobes))
    cleft = 1 + anatomy.gluteal_cleft * (1.3 - frame.position) * np.exp(-(((angle - math.pi / 2) / 0.07) ** 2))
    rho = rho * cleft / lobes
    distance = np.hypot(x - cx, y - cy) * (1 - 1 / np.maximum(rho, 1e-3))
    canvas.paint(_soft(distance), anatomy.tissue.fat, 0.06, LABELS["body"], distance < 0)
    return distance, angle


def _paint_fat_rim(
    canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, body_distance: np.ndarray, angle: np.ndarray
) -> np.ndarray:
    """Leaves a rim of subcutaneous fat, thicker over the buttocks and lower abdomen, and paints muscle inside it.

    Returns:
        The soft mask of the inside of the rim (the muscle compartment).
    """
    sin_angle = np.sin(angle)
    thickness = (
        anatomy.fat_rim * frame.body_ry * (1 + 0.7 * np.clip(sin_angle, 0, None) + 0.3 * np.clip(-sin_angle, 0, None))
    )
    thickness *= 1 + sum(amp * np.cos((k + 3) * angle + phase) for k, (amp, phase) in enumerate(anatomy.fat_rim_lobes))
    inside = _soft(body_distance + thickness, 1.0)
    canvas.paint(inside, anatomy.tissue.muscle, 0.07)
    return inside


def _nearest_muscles(frame: _Frame, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest muscle ellipse, and the intensity factor of the nearest."""
    x, y = frame.x, frame.y
    nearest = np.full(x.shape, np.inf, np.float32)
    second = nearest.copy()
    gain_map = np.ones(x.shape, np.float32)
    for muscle, gain in zip(_MUSCLES, anatomy.muscle_gain):
        size = _bump(frame.level, (muscle.level_from + muscle.level_to) / 2, (muscle.level_to - muscle.level_from) / 2)
        for side in _SIDES if size > 0 else ():
            centre_x, centre_y = frame.cx + side * muscle.u * frame.body_rx, frame.cy + muscle.v * frame.body_ry
            rx, ry = muscle.rx * frame.body_rx * (0.6 + 0.4 * size), muscle.ry * frame.body_ry * (0.6 + 0.4 * size)
            distance = _ellipse_sdf(x, y, centre_x, centre_y, rx, ry, angle=side * muscle.angle)
            second = np.minimum(second, np.maximum(nearest, distance))
            gain_map = np.where(distance < nearest, np.float32(gain * (1 + 0.03 * side)), gain_map)
            nearest = np.minimum(nearest, distance)
    return nearest, second, gain_map


def _paint_muscles(
    canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, fields: _CaseFields, inside: np.ndarray, rng: np.random.Generator
) -> None:
    """Muscles as a partition of the inside of the fat rim, with intermuscular fat planes and patchy septa.

    Each pixel belongs to the nearest muscle ellipse, and thin fat planes run where two are equally near, which is
    how intermuscular planes look on a real slice. Faint fat septa inside muscle bellies are patchy like real
    marbling. Draws one noise field from ``rng``.
    """
    tissue = anatomy.tissue
    nearest, second, gain_map = _nearest_muscles(frame, anatomy)
    canvas.paint(inside, tissue.muscle * gain_map, 0.07)
    plane_width = np.maximum(1.2 + 0.4 * fields.plane_width, 0.6)
    canvas.paint(inside * 0.8 * np.exp(-(((second - nearest) / plane_width) ** 2)), tissue.fat, 0.06)
    septa = np.exp(-((_smooth_noise(rng, frame.x.shape, 4.0) / 0.1) ** 2))
    septa *= anatomy.septa * np.clip(fields.patchiness, 0, 1)
    canvas.paint(septa * inside, tissue.fat, 0.06)


def _paint_pelvic_fat(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy) -> None:
    """Intrapelvic fat, narrowed towards the apex by the levator sling, and the ischioanal fossae beside the
    anorectum."""
    x, y, cx, cy, body_rx, body_ry = frame.x, frame.y, frame.cx, frame.cy, frame.body_rx, frame.body_ry
    fat = anatomy.tissue.fat
    half_width = (0.22 + 0.16 * min(max(frame.position, 0), 1)) * body_rx * anatomy.pelvic_fat
    pelvic_fat = _ellipse_sdf(x, y, cx, cy + 0.05 * body_ry, half_width, 0.62 * body_ry, power=2.4)
    canvas.paint(_soft(pelvic_fat, 1.2), fat, 0.05)
    size = _bump(frame.level, 0.1, 0.4)
    for side in _SIDES if size > 0 else ():
        rx, ry = 0.12 * body_rx * size, 0.3 * body_ry * size
        fossa = _ellipse_sdf(x, y, cx + side * 0.2 * body_rx, cy + 0.42 * body_ry, rx, ry, angle=-side * 0.6)
        canvas.paint(_soft(fossa, 1.2), fat, 0.05)


def _hip_centres(frame: _Frame, anatomy: _Anatomy) -> tuple[list[float], float]:
    """Left-right positions of the right and left hip joints, and their common anterior-posterior position."""
    hip_x = [frame.cx + side * anatomy.hip_u * frame.body_rx for side in _SIDES]
    return hip_x, frame.cy + anatomy.hip_v * frame.body_ry


def _femoral_head(frame: _Frame, anatomy: _Anatomy, side: int) -> tuple[float, float]:
    """Level of one femoral head's centre (the pelvis may be tilted) and its radius on this slice."""
    centre_level = anatomy.femoral_head_level + side * anatomy.pelvic_tilt
    return centre_level, anatomy.femoral_head_radius * _bump(
        frame.level, centre_level, anatomy.femoral_head_half_extent
    )


def _femur_parts(frame: _Frame, anatomy: _Anatomy, side: int, hip_x: float, hip_y: float) -> list[np.ndarray]:
    """Signed distances to one femur's head, neck with greater trochanter, and shaft (those cut by the slice)."""
    x, y = frame.x, frame.y
    centre_level, head_radius = _femoral_head(frame, anatomy, side)
    parts = []
    if head_radius > 1:
        parts.append(np.hypot(x - hip_x, y - hip_y) - head_radius)
    neck = _bump(frame.level, centre_level - anatomy.femoral_head_half_extent - 0.02, 0.14)
    if neck > 0:
        parts.append(_capsule_sdf(x, y, hip_x, hip_y, hip_x + side * 22, hip_y + 8, 6 + 5 * neck))
    shaft = min(1.0, max(0.0, (centre_level - anatomy.femoral_head_half_extent - frame.level) / 0.1))
    if shaft > 0:  # further down
        parts.append(np.hypot(x - hip_x - side * 18, y - hip_y - 4) - 11 * shaft)
    return parts


def _pelvic_parts(
    frame: _Frame, anatomy: _Anatomy, midline: _Midline, side: int, hip_x: float, hip_y: float
) -> list[np.ndarray]:
    """Signed distances to one side's acetabulum, ischium, pubic bone, superior ramus and iliac bone (those cut by
    the slice)."""
    x, y, cx, cy, body_rx, body_ry = frame.x, frame.y, frame.cx, frame.cy, frame.body_rx, frame.body_ry
    level, symphysis_y = frame.level, midline.symphysis_y
    parts = []
    centre_level, head_radius = _femoral_head(frame, anatomy, side)
    socket_radius = (anatomy.femoral_head_radius + 6) * _bump(
        level, centre_level + 0.06, anatomy.femoral_head_half_extent + 0.06
    )
    if socket_radius > 1:  # the acetabulum covers the medial side of the head, fully at the roof
        cut = side * (x - hip_x) - 0.4 * head_radius - 3 * max(0.0, socket_radius - head_radius - 6)
        parts.append(np.maximum(np.hypot(x - hip_x, y - hip_y) - socket_radius, cut))
    ischium = _bump(level, 0.25, 0.35)
    if ischium > 0:  # posterior column down to the tuberosity
        x0 = cx + side * 0.36 * body_rx
        parts.append(_capsule_sdf(x, y, x0, hip_y + 6, x0 - side * 4, cy + 0.36 * body_ry, 4 + 6 * ischium))
    pubis = _bump(level, 0.2, 0.28)
    if pubis > 0:  # either side of the symphysis
        parts.append(
            _capsule_sdf(x, y, cx + side * 5, symphysis_y, cx + side * 0.17 * body_rx, symphysis_y + 3, 4 + 4 * pubis)
        )
    ramus = _bump(level, 0.42, 0.12)
    if ramus > 0:  # superior ramus running to the acetabulum
        parts.append(_capsule_sdf(x, y, cx + side * 6, symphysis_y, hip_x - side * 12, hip_y - 12, 4 + 4 * ramus))
    ilium = _ramp(level, 0.72, 0.15)
    if ilium > 0:  # above the acetabulum
        mid_x, mid_y = (hip_x + cx + side * 0.3 * body_rx) / 2, hip_y + 0.3 * body_ry
        parts.append(_capsule_sdf(x, y, hip_x + side * 2, hip_y - 4, mid_x, mid_y, 5 + 7 * ilium))
        parts.append(_capsule_sdf(x, y, mid_x, mid_y, cx + side * 0.28 * body_rx, cy + 0.55 * body_ry, 3 + 4 * ilium))
    return parts


def _sacrum(frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> list[np.ndarray]:
    """Signed distance to the coccyx widening into the sacrum behind the rectum, if the slice cuts it."""
    size = _ramp(frame.level, 0.5, 0.4)
    if size <= 0:
        return []
    sacrum_y = min(frame.cy + 0.68 * frame.body_ry, midline.rectum_y + anatomy.rectum_ry + 10)
    rx, ry = 4 + 0.22 * frame.body_rx * size, 3 + 5 * size
    return [_ellipse_sdf(frame.x, frame.y, frame.cx, sacrum_y + 3 + 3 * size, rx, ry, power=2.5)]


def _paint_bones(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """Pelvic ring (one union) and femora (another), each a dark cortex shell (label 2) around bright fatty marrow;
    a hyaline cartilage gap separates each femoral head from its acetabulum."""
    pelvis, femora = [], []
    hip_x, hip_y = _hip_centres(frame, anatomy)
    for side, x in zip(_SIDES, hip_x):
        pelvis += _pelvic_parts(frame, anatomy, midline, side, x, hip_y)
        femora += _femur_parts(frame, anatomy, side, x, hip_y)
    pelvis += _sacrum(frame, anatomy, midline)
    tissue = anatomy.tissue
    for parts in (pelvis, femora):
        if not parts:
            continue
        distance = np.minimum.reduce(parts) if len(parts) > 1 else parts[0]
        if parts is femora:
            canvas.paint(_soft(distance - 1.8), 0.9 * tissue.central_gland, 0.05)
        canvas.paint(_soft(distance), tissue.cortex, 0.1, LABELS["bone"], distance < 0)
        canvas.paint(_soft(distance + 2.0), tissue.marrow, 0.05)


def _paint_femoral_vessels(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy) -> None:
    """Flow voids of the femoral artery and vein, anteromedial to each hip."""
    hip_x, hip_y = _hip_centres(frame, anatomy)
    for side, x in zip(_SIDES, hip_x):
        for k, radius in ((0, 3.5), (1, 4.5)):
            vessel_x, vessel_y = x - side * (6 + 8 * k), hip_y - anatomy.femoral_head_radius - 8
            distance = np.hypot(frame.x - vessel_x, frame.y - vessel_y) - radius
            canvas.paint(_soft(distance), 0.3 * anatomy.tissue.muscle, 0.05)


def _paint_levator_ani(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """The muscular sling around the lower rectum and prostate."""
    size = _bump(frame.level, 0.1, 0.4)
    cx, cy = frame.cx, frame.cy
    for side in _SIDES if size > 0 else ():
        rectum_x, pelvic_wall_x = cx + side * (anatomy.rectum_rx + 4), cx + side * 0.3 * frame.body_rx
        distance = _capsule_sdf(
            frame.x, frame.y, rectum_x, midline.rectum_y + 4, pelvic_wall_x, cy - 0.05 * frame.body_ry, 1.5 + 1.5 * size
        )
        canvas.paint(_soft(distance), 0.9 * anatomy.tissue.muscle, 0.07)


def _paint_mesorectum(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """Mesorectal fat wrapped in its thin dark fascia."""
    rx, ry = anatomy.rectum_rx, anatomy.rectum_ry
    fascia = _ellipse_sdf(frame.x, frame.y, frame.cx, midline.rectum_y, rx + 9, ry + 8)
    canvas.paint(_soft(fascia), anatomy.tissue.muscle, 0.05)
    fat = _ellipse_sdf(frame.x, frame.y, frame.cx, midline.rectum_y, rx + 8, ry + 7)
    canvas.paint(_soft(fat), anatomy.tissue.fat, 0.06)


def _paint_bladder(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """Bladder wall (label 3) and urine: grows superiorly from the base, which sits on the prostate, and drifts
    anteriorly as it fills."""
    filling = _ramp(frame.position, anatomy.bladder_onset, 0.4) ** 0.6
    if filling <= 0:
        return
    dome_y = frame.cy + anatomy.bladder_v * frame.body_ry
    rx = anatomy.bladder_rx * filling + 4
    ry = min(rx * anatomy.bladder_aspect, (midline.rectum_y - anatomy.rectum_ry - 4 - dome_y))
    centre_y = (1 - filling) * midline.prostate_y + filling * dome_y
    distance = _ellipse_sdf(frame.x, frame.y, frame.cx, centre_y, rx, max(ry, 4), power=anatomy.bladder_power)
    canvas.paint(_soft(distance), 1.1 * anatomy.tissue.muscle, 0.05, LABELS["bladder"], distance < 0)
    canvas.paint(_soft(distance + 2.0), anatomy.tissue.urine, 0.02)


def _paint_seminal_vesicles(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """Bright convoluted bow-tie above the prostate base."""
    size = _bump(frame.level, anatomy.prostate_level + anatomy.prostate_half_extent + 0.05, 0.12)
    if size <= 0:
        return
    for side in _SIDES:
        centre_x, centre_y = frame.cx + side * 14, midline.rectum_y - anatomy.rectum_ry - 6
        distance = _ellipse_sdf(frame.x, frame.y, centre_x, centre_y, 13 * size, 4 * size + 1, angle=side * 0.35)
        canvas.paint(_soft(distance), anatomy.tissue.seminal_vesicle, 0.12)


def _paint_prostate(canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline) -> None:
    """Dark capsule (label 5), bright peripheral zone and heterogeneous central gland."""
    rx, ry, centre_y = midline.prostate_rx, midline.prostate_ry, midline.prostate_y
    if rx <= 2:
        return
    tissue = anatomy.tissue
    distance = _ellipse_sdf(frame.x, frame.y, frame.cx, centre_y, rx, ry)
    canvas.paint(_soft(distance), 0.8 * tissue.muscle, 0.05, LABELS["prostate"], distance < 0)
    canvas.paint(_soft(distance + 1.3), tissue.peripheral_zone, 0.1)
    central = _ellipse_sdf(frame.x, frame.y, frame.cx, centre_y - 0.3 * ry, 0.68 * rx, 0.6 * ry)
    canvas.paint(_soft(central, 1.2), tissue.central_gland, 0.18)


def _paint_rectum(
    canvas: _Canvas, frame: _Frame, anatomy: _Anatomy, midline: _Midline, rng: np.random.Generator
) -> None:
    """Dark muscular wall (label 4) around mixed stool and gas. Draws one noise field from ``rng``."""
    distance = _ellipse_sdf(frame.x, frame.y, frame.cx, midline.rectum_y, anatomy.rectum_rx, anatomy.rectum_ry)
    canvas.paint(_soft(distance), anatomy.tissue.rectal_wall, 0.06, LABELS["rectum"], distance < 0)
    lumen = _soft(distance + 3.0)
    canvas.paint(lumen, anatomy.tissue.rectal_content, 0.3)
    gas = _soft(anatomy.rectal_gas - _smooth_noise(rng, frame.x.shape, 3.0), 0.15)
    canvas.paint(lumen * gas, 0.0, 0.0)


def _add_texture(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Multiplies the image by fine noise, as strong in each tissue as its painted texture strength."""
    canvas.image *= 1 + canvas.texture * _smooth_noise(rng, canvas.image.shape, 1.0)


def _bias_field(frame: _Frame, anatomy: _Anatomy) -> np.ndarray:
    """Smooth coil sensitivity, brighter posteriorly near the spine coil."""
    width = frame.x.shape[1]
    bu, bv = (frame.x - frame.cx) / HEIGHT, (frame.y - frame.cy) / width
    c_u, c_v, c_uv = anatomy.bias
    bias = np.exp(c_u * bu + c_v * bv + c_uv * bu * bv + 0.05 * (frame.position - 0.5))
    bias *= 1 + anatomy.coil_gain * (0.5 + bv) + 0.5 * anatomy.coil_gain * (bu * bu)
    return bias


def _acquire(image: np.ndarray, bias: np.ndarray, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """What the scanner records: bias field and gain, a light blur for partial volume, then Rician noise (the
    magnitude of a complex signal with Gaussian noise on both channels)."""
    image = gaussian_filter(image * bias * anatomy.gain, 0.6)
    real, imaginary = rng.standard_normal((2, *image.shape), dtype=np.float32) * anatomy.noise_sigma
    return np.sqrt((image + real) ** 2 + imaginary**2)


def phantom_slice(
    case_id: int, slice_idx: int, num_slices: int = 16, width: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
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

    Raises:
        ValueError: ``slice_idx`` outside ``[0, num_slices)``, a negative case or seed, or ``width < 32``.
    """
    if not 0 <= slice_idx < num_slices:
        raise ValueError(f"slice_idx {slice_idx} outside [0, {num_slices})")
    if min(case_id, seed) < 0 or width < 32:
        raise ValueError("case_id and seed must be >= 0 and width >= 32")
    anatomy, fields = _case_anatomy(case_id, seed), _case_fields(case_id, seed, width)
    frame = _slice_frame(anatomy, fields, slice_idx, num_slices, width)
    midline = _midline(frame, anatomy)
    noise_rng = _rng(seed, case_id, 1, slice_idx)  # draws, in order: septa, rectal gas, texture, Rician noise
    canvas = _Canvas((HEIGHT, width))
    body_distance, angle = _paint_body_outline(canvas, frame, anatomy)
    inside_rim = _paint_fat_rim(canvas, frame, anatomy, body_distance, angle)
    _paint_muscles(canvas, frame, anatomy, fields, inside_rim, noise_rng)
    _paint_pelvic_fat(canvas, frame, anatomy)
    _paint_bones(canvas, frame, anatomy, midline)
    _paint_femoral_vessels(canvas, frame, anatomy)
    _paint_levator_ani(canvas, frame, anatomy, midline)
    _paint_mesorectum(canvas, frame, anatomy, midline)
    _paint_bladder(canvas, frame, anatomy, midline)
    _paint_seminal_vesicles(canvas, frame, anatomy, midline)
    _paint_prostate(canvas, frame, anatomy, midline)
    _paint_rectum(canvas, frame, anatomy, midline, noise_rng)
    _add_texture(canvas, noise_rng)
    image = _acquire(canvas.image, _bias_field(frame, anatomy), anatomy, noise_rng)
    return image.astype(np.float32), canvas.labels


def _plan(
    train_cases: int, val_cases: int, test_cases: int, slices_per_case: int, seed: int, trailing_axis_every: int
) -> dict:
    """What a data set holds: generator version, settings, case ids per split and slice counts (``phantom.json``)."""
    if slices_per_case < 1 or trailing_axis_every < 0 or seed < 0:
        raise ValueError("need slices_per_case >= 1, trailing_axis_every >= 0 and seed >= 0")
    counts = {"train": train_cases, "validate": val_cases, "test": test_cases}
    cases = {}
    for split, count in counts.items():
        first, last = _SPLIT_ID_RANGE[split]
        if not 0 <= count <= last - first + 1:
            raise ValueError(f"{split}: {count} cases, at most {last - first + 1} supported")
        cases[split] = list(range(first, first + count))
    return {
        "generator": "bundle.data.phantom",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "slices_per_case": slices_per_case,
        "trailing_axis_every": trailing_axis_every,
        "cases": cases,
        "counts": {split: len(ids) * slices_per_case for split, ids in cases.items()},
    }


def _is_complete(out_dir: Path, plan: dict) -> bool:
    """Whether ``out_dir`` holds a finished set made with exactly ``plan``."""
    try:
        meta = json.loads((out_dir / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta != plan:
        return False
    return all(
        len(list((out_dir / f"keras_slices{sub}_{split}").glob("*.nii.gz"))) == count
        for split, count in plan["counts"].items()
        for sub in ("", "_seg")
    )


def _write_files(root: Path, plan: dict) -> None:
    """Renders every slice of ``plan`` and writes the images, masks and, last, ``phantom.json`` under ``root``."""
    seed, num_slices, trailing_every = plan["seed"], plan["slices_per_case"], plan["trailing_axis_every"]
    written = 0
    for split, case_ids in plan["cases"].items():
        image_dir, mask_dir = root / f"keras_slices_{split}", root / f"keras_slices_seg_{split}"
        image_dir.mkdir()
        mask_dir.mkdir()
        for case_id in case_ids:
            width, week = case_layout(case_id, seed)
            for slice_idx in range(num_slices):
                image, mask = phantom_slice(case_id, slice_idx, num_slices, width, seed)
                written += 1
                if trailing_every > 0 and written % trailing_every == 0:
                    image = image[..., None]
                stem = f"{case_id:03d}_week_{week}_slice_{slice_idx}.nii.gz"
                (image_dir / f"case_{stem}").write_bytes(nifti_gz_bytes(image))
                (mask_dir / f"seg_{stem}").write_bytes(nifti_gz_bytes(mask))
    # Written last: its presence inside out_dir marks a finished set.
    (root / _META_FILE).write_text(json.dumps(plan, indent=1) + "\n")


def _move_into_place(built: Path, out_dir: Path, plan: dict) -> None:
    """Renames the finished set ``built`` to ``out_dir``, replacing an older set of ours there."""
    if _is_complete(out_dir, plan):  # a concurrent writer finished first
        return
    old = None
    if out_dir.exists():
        old = out_dir.parent / f"{built.name}.old"
        os.rename(out_dir, old)
    try:
        os.rename(built, out_dir)
    except OSError:
        if not _is_complete(out_dir, plan):  # a concurrent writer may have won the race
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_hipmri_phantoms(
    out_dir: str | os.PathLike,
    train_cases: int = 20,
    val_cases: int = 3,
    test_cases: int = 8,
    slices_per_case: int = 16,
    seed: int = 0,
    trailing_axis_every: int = 0,
) -> dict[str, int]:
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

    Raises:
        FileExistsError: ``out_dir`` is a non-empty folder without ``phantom.json``.
        ValueError: invalid counts or settings.
    """
    out_dir = Path(out_dir)
    plan = _plan(train_cases, val_cases, test_cases, slices_per_case, seed, trailing_axis_every)
    if _is_complete(out_dir, plan):
        return dict(plan["counts"])
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _META_FILE).exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no {_META_FILE}; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        built.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the final set
        _write_files(built, plan)
        _move_into_place(built, out_dir, plan)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return dict(plan["counts"])


def demo_data_dir(bundle_root: str | os.PathLike) -> Path:
    """Where the bundle's configs look for demo data by default: ``<bundle_root>/data/phantom``."""
    return Path(bundle_root) / DEMO_SUBDIR


def write_demo_phantoms(bundle_root: str | os.PathLike) -> Path:
    """Writes the default phantom set into :func:`demo_data_dir` (a no-op when it is already complete).

    Args:
        bundle_root: the bundle's root folder.

    Returns:
        The demo data folder.
    """
    out_dir = demo_data_dir(bundle_root)
    write_hipmri_phantoms(out_dir)
    return out_dir


def save_phantom_figure(path: str | os.PathLike, seed: int = 0, num_slices: int = 16, n: int = 8) -> Path:
    """Saves a grid of phantom slices displayed like axial pelvic MRI.

    Each panel shows ``image.T`` (anterior up, patient right on the viewer's
    left) with a per-image window from 0 to the 99th percentile, so a full
    bladder saturates slightly as it does on a soft-tissue window.

    Args:
        path: Output PNG path.
        seed: Data-set seed.
        num_slices: Slices per case the positions are drawn from.
        n: Number of panels, four a row: cases 1 to ``n``, their slice positions
            spread evenly from the first to the last.

    Returns:
        The written path.
    """
    path = Path(path)
    tiles = []
    for i in range(n):
        case_id = 1 + i
        width, _ = case_layout(case_id, seed)
        slice_idx = round(i * (num_slices - 1) / max(n - 1, 1))
        image, _ = phantom_slice(case_id, slice_idx, num_slices, width, seed)
        tiles.append(to_uint8(image, 0.0, float(np.percentile(image, 99))))
    save_tiles(path, tiles, columns=4)
    return path

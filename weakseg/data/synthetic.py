"""A seeded, H&E-like demo dataset in MHIST's layout, with pixel truth.

Tissue is rendered as hematoxylin and eosin *concentration* maps (optical density), then turned into RGB
with the Beer-Lambert law using per-tile jittered stain vectors, stain strengths and light intensity, so
that stain normalization has real work to do.

* Negative ("HP"-like) tiles hold regular round crypts: a round white lumen, a ring of pale epithelium
  and a ring of basal nuclei, in eosin-pink stroma with scattered nuclei.
* Positive ("SSA"-like) tiles hold, in one or more contiguous regions covering roughly 15-60% of the
  tissue, serrated glands: star-shaped saw-tooth lumens, elongated glands with a dilated base. The rest
  of a positive tile looks negative. The mask is that region (a serrated gland counts whole, a regular
  crypt never does), restricted to tissue.

Both classes draw stain jitter, slide background, gland lattice and sizes and stromal nuclei from the
same distributions. Serrated glands match regular crypts in lumen area on average but cover about a fifth
less area, so a serrated region holds less epithelium and more eosin-pink stroma: the classes differ in
colour composition (not in stain), and colour alone separates them in part (see the README, which gives
the colour-only AUC; tests/test_synthetic.py checks it).

Label noise flips the *label* of a fraction of tiles; the mask stays the truth of what was drawn, so a
flipped negative-labelled tile may carry a non-empty mask (and a flipped positive one an empty mask).

Every tile has its own generator seeded by ``(seed, tile index)``: the same parameters give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from weakseg.data.layout import Tile, write_annotations
from weakseg.io import write_png
from weakseg.params import SyntheticSourceParams

# Ruifrok & Johnston's optical-density stain vectors (rows: hematoxylin, eosin), RGB order.
HEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.092, 0.912, 0.400])  # a little blue absorption: pink, not magenta

# Tissue compartments of the label image.
STROMA, EPITHELIUM, LUMEN, BACKGROUND = 0, 1, 2, 3

# Mean (hematoxylin, eosin) concentration per compartment, before per-tile stain strength.
_COMPARTMENT_CONCENTRATIONS = np.array(
    [
        [0.08, 0.50],  # stroma: eosin-pink collagen
        [0.20, 0.30],  # epithelium: paler, slightly purple cytoplasm
        [0.010, 0.020],  # lumen: nearly white
        [0.004, 0.008],  # glass
    ]
)
_NUCLEUS_HEMATOXYLIN = 1.25
_NUCLEUS_EOSIN = 0.10
_REFERENCE_SIZE = 128.0  # gland sizes below are in pixels at this tile size


@dataclass(frozen=True)
class SyntheticTile:
    """One rendered tile."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    mask: np.ndarray  # (S, S) bool, pixel truth of the serrated region
    positive: bool  # what was drawn (before any label noise)


# --------------------------------------------------------------------------------------------- stains
def _jittered_unit(vector: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    jittered = np.abs(vector + rng.normal(0.0, spread, size=3))
    return jittered / np.linalg.norm(jittered)


def _random_stains(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Per-tile stain vectors, strengths and light intensity (identical distribution for both classes)."""
    hematoxylin = _jittered_unit(HEMATOXYLIN_OD, rng, 0.06)
    eosin = _jittered_unit(EOSIN_OD, rng, 0.06)
    hematoxylin_strength = float(rng.lognormal(0.0, 0.18))
    eosin_strength = float(rng.lognormal(0.0, 0.18))
    light = 244.0 + rng.uniform(-6.0, 8.0) + rng.normal(0.0, 2.0, size=3)
    return hematoxylin, eosin, hematoxylin_strength, eosin_strength, np.clip(light, 225.0, 255.0)


# ----------------------------------------------------------------------------------------- geometry
def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma``.

    Wide fields are drawn on a coarse grid and resized up: the same look at a fraction of the cost of a
    wide Gaussian kernel at full resolution.
    """
    factor = max(1, int(sigma / 3.0))
    coarse_size = int(np.ceil(size / factor)) + 1
    noise = rng.normal(size=(coarse_size, coarse_size))
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma / factor, borderType=cv2.BORDER_REFLECT)
    if factor > 1:
        field = cv2.resize(field, (coarse_size * factor, coarse_size * factor), interpolation=cv2.INTER_LINEAR)
    field = field[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-12)


def _tissue_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Tissue versus glass: about a third of tiles show a wavy tissue edge with slide background."""
    if rng.random() >= 0.35:
        return np.ones((size, size), dtype=bool)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    distance = xx * np.cos(angle) + yy * np.sin(angle)
    edge = distance + 0.05 * _smooth_field(rng, size, size / 10)
    return edge < rng.uniform(0.2, 0.42)  # 8-30% glass


def _positive_region(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """One or more contiguous blobs covering about 25-58% of the tissue."""
    size = tissue.shape[0]
    field = _smooth_field(rng, size, size / 6.0)
    fraction = rng.uniform(0.25, 0.58)
    threshold = np.quantile(field[tissue], 1.0 - fraction)
    region = (field > threshold) & tissue
    labels, count = ndimage.label(region)
    if count > 1:
        # Drop specks: a region is a sizeable patch of glands, not a few pixels.
        sizes = ndimage.sum(region, labels, index=np.arange(1, count + 1))
        keep = np.flatnonzero(sizes >= 0.04 * tissue.sum()) + 1
        if keep.size == 0:
            keep = np.array([int(np.argmax(sizes)) + 1])
        region = np.isin(labels, keep)
    return region


def _gland_centres(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """Jittered hexagonal grid of centres, extending past the edges so glands can be cut by the border."""
    rows = np.arange(-1, int(size / (spacing * 0.866)) + 2)
    columns = np.arange(-1, int(size / spacing) + 2)
    grid_y, grid_x = np.meshgrid(rows * spacing * 0.866, columns * spacing, indexing="ij")
    grid_x = grid_x + (rows[:, None] % 2) * spacing / 2
    centres = np.stack([grid_y.ravel(), grid_x.ravel()], axis=1)
    centres += rng.uniform(0, spacing, size=2) + rng.normal(0.0, 0.13 * spacing, size=centres.shape)
    centres -= spacing
    inside = np.all((centres > -spacing * 0.4) & (centres < size + spacing * 0.4), axis=1)
    centres = centres[inside]
    # A few gaps in the gland lattice look like real mucosa (stroma between crypts varies).
    return centres[rng.random(len(centres)) > 0.12]


def _triangle_wave(phase: np.ndarray) -> np.ndarray:
    """Saw-tooth (triangle) wave in [-1, 1] with period 2*pi, mean 0."""
    return 2.0 * np.abs(2.0 * (phase / (2 * np.pi) - np.floor(phase / (2 * np.pi) + 0.5))) - 1.0


@dataclass(frozen=True)
class _GlandShape:
    centre_y: float
    centre_x: float
    radius: float  # outer radius along the long axis
    aspect: float  # long / short axis
    orientation: float
    serrated: bool
    teeth: int
    tooth_phase: float
    wobble_phase: float


def _radii(shape: _GlandShape, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lumen and outer radius (in the gland's normalized frame) as functions of the polar angle."""
    if shape.serrated:
        # Dilated base: the gland and its lumen widen towards theta = 0.
        base = np.maximum(np.cos(theta), 0.0) ** 2
        outer = shape.radius * (0.90 + 0.22 * base)
        teeth = _triangle_wave(shape.teeth * theta + shape.tooth_phase)
        lumen = shape.radius * (0.44 + 0.22 * base) * (1.0 + 0.45 * teeth)
    else:
        wobble = 0.04 * np.sin(2 * theta + shape.wobble_phase)
        outer = shape.radius * (1.0 + wobble)
        lumen = shape.radius * (0.47 + wobble)
    return lumen, outer


def _draw_gland(
    shape: _GlandShape,
    compartments: np.ndarray,
    serrated_map: np.ndarray,
    footprint_map: np.ndarray,
    nucleus_spacing: float,
) -> np.ndarray:
    """Paints one gland into the label image; returns its nucleus centres ``(K, 2)`` in pixels."""
    size = compartments.shape[0]
    reach = shape.radius * 1.25 * max(shape.aspect, 1.0) + 2
    top, bottom = int(max(0, np.floor(shape.centre_y - reach))), int(min(size, np.ceil(shape.centre_y + reach)))
    left, right = int(max(0, np.floor(shape.centre_x - reach))), int(min(size, np.ceil(shape.centre_x + reach)))
    cos_o, sin_o = np.cos(shape.orientation), np.sin(shape.orientation)
    if top < bottom and left < right:
        yy, xx = np.mgrid[top:bottom, left:right].astype(np.float64)
        dy, dx = yy - shape.centre_y, xx - shape.centre_x
        # Gland frame: u along the long axis (stretched by the aspect), v across.
        u = (dx * cos_o + dy * sin_o) / np.sqrt(shape.aspect)
        v = (-dx * sin_o + dy * cos_o) * np.sqrt(shape.aspect)
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        lumen_radius, outer_radius = _radii(shape, theta)
        gland = rho < outer_radius
        window = compartments[top:bottom, left:right]
        window[gland] = EPITHELIUM
        window[rho < lumen_radius] = LUMEN
        serrated_map[top:bottom, left:right][gland] = shape.serrated
        footprint_map[top:bottom, left:right] |= gland
    # Basal nuclei: a ring just inside the outer border, spaced evenly along the perimeter.
    count = max(6, int(round(2 * np.pi * shape.radius / nucleus_spacing)))
    theta_n = np.linspace(0, 2 * np.pi, count, endpoint=False) + shape.wobble_phase
    lumen_n, outer_n = _radii(shape, theta_n)
    rho_n = outer_n - 0.33 * np.clip(outer_n - lumen_n, 0.0, None)
    u_n, v_n = rho_n * np.cos(theta_n) * np.sqrt(shape.aspect), rho_n * np.sin(theta_n) / np.sqrt(shape.aspect)
    x_n = shape.centre_x + u_n * cos_o - v_n * sin_o
    y_n = shape.centre_y + u_n * sin_o + v_n * cos_o
    return np.stack([y_n, x_n], axis=1)


def _disk(radius: float) -> np.ndarray:
    reach = int(np.ceil(radius))
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    return (yy**2 + xx**2) <= radius**2 + 0.25


def _splat(points: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Puts ``values`` at integer-rounded ``points`` (inside the tile) of a zero image (max on collision)."""
    image = np.zeros((size, size))
    rows, columns = np.round(points[:, 0]).astype(int), np.round(points[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < size) & (columns >= 0) & (columns < size)
    np.maximum.at(image, (rows[inside], columns[inside]), values[inside])
    return image


# ---------------------------------------------------------------------------------------------- tile
def draw_gland_shape(
    rng: np.random.Generator, centre_y: float, centre_x: float, mean_radius: float, serrated: bool
) -> _GlandShape:
    """One gland's random shape (the draws, in order, that :func:`render_tile` makes for each gland)."""
    radius = mean_radius * rng.uniform(0.85, 1.15)
    return _GlandShape(
        centre_y=centre_y,
        centre_x=centre_x,
        # Serrated glands are elongated; their radius is scaled so that their lumen area matches a
        # regular crypt's on average. Their whole area is about a fifth smaller (less epithelium).
        radius=radius * (0.93 if serrated else 1.0),
        aspect=float(rng.uniform(1.6, 2.1)) if serrated else float(rng.uniform(1.0, 1.12)),
        orientation=float(rng.uniform(0, 2 * np.pi)),
        serrated=serrated,
        teeth=int(rng.integers(7, 10)),
        tooth_phase=float(rng.uniform(0, 2 * np.pi)),
        wobble_phase=float(rng.uniform(0, 2 * np.pi)),
    )


def render_tile(rng: np.random.Generator, size: int, positive: bool) -> SyntheticTile:
    """Renders one H&E-like tile.

    Args:
        rng: the tile's own generator (everything random is drawn from it).
        size: tile side in pixels.
        positive: draw a serrated (SSA-like) region, or only regular crypts.

    Returns:
        The RGB tile, its pixel truth, and the drawn class.
    """
    scale = size / _REFERENCE_SIZE
    # Draw everything shared by both classes first, in the same order, so their distributions match.
    stains = _random_stains(rng)
    tissue = _tissue_mask(rng, size)
    mean_radius = rng.uniform(9.0, 12.5) * scale
    spacing = mean_radius * rng.uniform(2.35, 2.7)
    centres = _gland_centres(rng, size, spacing)
    region_rng = np.random.default_rng(rng.integers(2**63))  # drawn for both classes to keep streams aligned
    region = _positive_region(region_rng, tissue) if positive else np.zeros((size, size), dtype=bool)

    compartments = np.full((size, size), STROMA, dtype=np.uint8)
    serrated_map = np.zeros((size, size), dtype=bool)
    footprint = np.zeros((size, size), dtype=bool)
    nucleus_spacing = 3.1 * scale
    nuclei: list[np.ndarray] = []
    for centre_y, centre_x in centres:
        iy, ix = min(max(round(centre_y), 0), size - 1), min(max(round(centre_x), 0), size - 1)
        shape = draw_gland_shape(rng, float(centre_y), float(centre_x), mean_radius, bool(region[iy, ix]))
        nuclei.append(_draw_gland(shape, compartments, serrated_map, footprint, nucleus_spacing))
    gland_nuclei = np.concatenate(nuclei) if nuclei else np.zeros((0, 2))

    # Stromal nuclei (lymphocytes, fibroblasts): same density for both classes.
    stromal_count = rng.poisson(0.0042 * size * size)
    stromal = rng.uniform(0, size, size=(stromal_count, 2))
    stromal_rows = np.clip(stromal[:, 0].astype(int), 0, size - 1)
    stromal_columns = np.clip(stromal[:, 1].astype(int), 0, size - 1)
    stromal = stromal[compartments[stromal_rows, stromal_columns] == STROMA]

    compartments[~tissue] = BACKGROUND
    # Small stromal clefts (retraction artefacts) look like white space in real sections.
    clefts = (_smooth_field(rng, size, 2.0 * scale) > 2.6) & (compartments == STROMA)
    compartments[clefts] = LUMEN

    concentrations = _COMPARTMENT_CONCENTRATIONS[compartments]  # (S, S, 2)
    texture = 1.0 + 0.22 * _smooth_field(rng, size, 1.2 * scale) + 0.12 * _smooth_field(rng, size, 6.0 * scale)
    concentrations = concentrations * np.clip(texture, 0.3, None)[..., None]

    nucleus_strength = np.concatenate(
        [rng.uniform(0.75, 1.15, size=len(gland_nuclei)), rng.uniform(0.8, 1.25, size=len(stromal))]
    )
    points = np.concatenate([gland_nuclei, stromal]) + rng.normal(0.0, 0.35 * scale, size=(len(nucleus_strength), 2))
    nucleus_map = cv2.dilate(_splat(points, nucleus_strength, size), _disk(1.7 * scale).astype(np.uint8))
    nucleus_map = cv2.GaussianBlur(nucleus_map, (0, 0), sigmaX=0.6 * scale, borderType=cv2.BORDER_REFLECT)
    nucleus_map *= tissue
    hematoxylin_c = concentrations[..., 0] + _NUCLEUS_HEMATOXYLIN * nucleus_map
    eosin_c = concentrations[..., 1] * (1.0 - 0.6 * np.clip(nucleus_map, 0, 1)) + _NUCLEUS_EOSIN * nucleus_map

    hematoxylin, eosin, hematoxylin_strength, eosin_strength, light = stains
    optical_density = (hematoxylin_strength * hematoxylin_c)[..., None] * hematoxylin + (eosin_strength * eosin_c)[
        ..., None
    ] * eosin
    rgb = light * np.exp(-optical_density)
    rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=0.5 * scale, borderType=cv2.BORDER_REFLECT)  # optics
    rgb += rng.normal(0.0, 2.5, size=rgb.shape)  # sensor noise
    image = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    # Truth: the region, with each gland counted whole by what it is (serrated in, regular crypt out).
    mask = (region & ~footprint) | serrated_map
    mask &= tissue
    return SyntheticTile(image=image, mask=mask, positive=positive)


# ------------------------------------------------------------------------------------------- dataset
def _assignments(params: SyntheticSourceParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile: drawn class, test partition, and label flip (exact counts, seeded)."""
    rng = np.random.default_rng([params.seed, 0xC1A55])
    count = params.num_tiles
    positives = int(round(params.positive_fraction * count))
    positives = min(max(positives, 1), count - 1)
    positive = np.zeros(count, dtype=bool)
    positive[rng.permutation(count)[:positives]] = True
    test = np.zeros(count, dtype=bool)
    # Stratified: each class contributes its share of the test partition.
    for members in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        chosen = int(round(params.test_fraction * len(members)))
        chosen = min(max(chosen, 1), len(members) - 1) if len(members) >= 2 else 0
        test[rng.permutation(members)[:chosen]] = True
    flipped = np.zeros(count, dtype=bool)
    flipped[rng.permutation(count)[: int(round(params.label_noise * count))]] = True
    return positive, test, flipped


def tile_name(index: int) -> str:
    """The file name of synthetic tile ``index``."""
    return f"synthetic_{index:05d}.png"


def generate_dataset(
    root: Path,
    params: SyntheticSourceParams,
    positive_label: str = "SSA",
    negative_label: str = "HP",
) -> list[Tile]:
    """Writes a synthetic dataset in MHIST's layout: ``images/``, ``masks/``, ``annotations.csv``.

    Args:
        root: the dataset folder (created if needed; files are written atomically one by one, so wrap it
            in :func:`weakseg.io.atomic_directory` for an all-or-nothing folder).
        params: counts, fractions, tile size, label noise and seed.
        positive_label: the label of tiles with a serrated region (MHIST: ``SSA``).
        negative_label: the label of the other tiles (MHIST: ``HP``).

    Returns:
        The tiles in file order (labels after label noise; ``positive`` follows the label).

    Raises:
        ValueError: if the two labels are equal.
    """
    if positive_label == negative_label:
        raise ValueError(f"positive and negative labels must differ, both are {positive_label!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    drawn_positive, test, flipped = _assignments(params)
    tiles: list[Tile] = []
    for index in tqdm(range(params.num_tiles), desc="synthetic tiles", unit="tile", leave=False):
        rng = np.random.default_rng([params.seed, index])
        rendered = render_tile(rng, params.tile_size, bool(drawn_positive[index]))
        name = tile_name(index)
        write_png(root / "images" / name, rendered.image)
        write_png(root / "masks" / name, rendered.mask)
        labelled_positive = bool(drawn_positive[index]) != bool(flipped[index])
        tiles.append(
            Tile(
                name=name,
                label=positive_label if labelled_positive else negative_label,
                partition="test" if test[index] else "train",
                positive=labelled_positive,
            )
        )
    write_annotations(root / "annotations.csv", tiles)
    return tiles

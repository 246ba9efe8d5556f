"""The demo slide model: a synthetic H&E tongue section with a known dense truth.

The slide shows a tongue section on glass: squamous cell carcinoma (confluent in the
centre, breaking up into nests at the invasive front and infiltrating the muscle),
collagenous stroma with fibroblasts and lymphocytes, skeletal muscle cut across and
along its fibres ("Other"), and glass. Pixels are made in optical-density space
(Beer-Lambert: hematoxylin and eosin concentrations times their stain vectors), with
stain strength and hue drifting smoothly across the slide.

How it stays seamless, deterministic and memory-bounded at any size:

* **Layout**: smooth class fields (tissue, muscle, tumour, ...) are computed once for the
  whole slide on a coarse grid (a few level-0 pixels per grid point) from hashed
  lattice noise. Each tile upsamples them (bicubic) at its own pixels, and the classes
  are thresholds of the upsampled fields, so the borders are smooth and the truth and
  the slide come from the very same numbers.
* **Texture**: nuclei, fibres and muscle cells are procedural and keyed by *global*
  coordinates: lattice values and nuclei come from a hash of (seed, grid cell), and a
  tile draws every nucleus of the cells overlapping it plus a margin. Tiles therefore
  join invisibly and the result does not depend on the tile size or order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Stain optical-density vectors (R, G, B) per unit concentration (typical H&E values).
_H_VEC = np.array([0.56, 0.72, 0.41], np.float32)
_H_VEC_BLUE = np.array([0.50, 0.66, 0.56], np.float32)  # a bluer hematoxylin for the hue drift
_E_VEC = np.array([0.20, 0.80, 0.54], np.float32)
_E_VEC_RED = np.array([0.10, 0.86, 0.46], np.float32)  # a redder eosin
_E_VEC_MUSCLE = np.array([0.05, 0.90, 0.40], np.float32)  # eosin on muscle fibres looks redder


# --------------------------------------------------------------------------------------
# Hashed lattice noise: the same value for the same global position, whatever the tile.
# --------------------------------------------------------------------------------------

def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 from integer lattice coordinates and a salt (splitmix64 mix)."""
    with np.errstate(over="ignore"):
        h = np.asarray(ix, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= np.asarray(iy, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.uint64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return ((h >> np.uint64(40)).astype(np.float32) / np.float32(2**24))


def _catmull_rom_matrix(coords: np.ndarray, cell: float) -> tuple[np.ndarray, int]:
    """Interpolation weights (len(coords), n_lattice) of a cubic through lattice values."""
    c = coords / cell
    i0 = int(np.floor(c.min())) - 1
    n = int(np.floor(c.max())) - i0 + 3
    base = np.floor(c).astype(int)
    t = c - base
    w = [(-t**3 + 2 * t**2 - t) / 2, (3 * t**3 - 5 * t**2 + 2) / 2, (-3 * t**3 + 4 * t**2 + t) / 2, (t**3 - t**2) / 2]
    m = np.zeros((len(c), n), np.float64)
    rows = np.arange(len(c))
    for k in range(4):
        m[rows, base - 1 + k - i0] += w[k]
    return m, i0


def _grid_noise(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Smooth noise in [-1, 1] on the grid xs x ys (exact, separable): for the coarse layout."""
    mx, ix0 = _catmull_rom_matrix(xs, cell)
    my, iy0 = _catmull_rom_matrix(ys, cell)
    jy, jx = np.mgrid[iy0:iy0 + my.shape[1], ix0:ix0 + mx.shape[1]]
    lattice = _hash(jx, jy, salt).astype(np.float64) * 2 - 1
    return (my @ lattice @ mx.T).astype(np.float32)


def _fine_noise(gx: np.ndarray, gy: np.ndarray, cell_u: float, cell_v: float, salt: int,
                angle: float = 0.0) -> np.ndarray:
    """Smooth noise in about [-1, 1] at pixel positions, stretched along ``angle`` (textures)."""
    import cv2

    ca, sa = math.cos(angle), math.sin(angle)
    u = (gx * ca + gy * sa) / cell_u
    v = (-gx * sa + gy * ca) / cell_v
    iu0, iv0 = int(np.floor(u.min())) - 2, int(np.floor(v.min())) - 2
    nu, nv = int(np.floor(u.max())) - iu0 + 4, int(np.floor(v.max())) - iv0 + 4
    jv, ju = np.mgrid[iv0:iv0 + nv, iu0:iu0 + nu]
    lattice = _hash(ju, jv, salt) * 2 - 1
    return cv2.remap(lattice, (u - iu0).astype(np.float32), (v - iv0).astype(np.float32),
                     cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def _smooth01(x: np.ndarray) -> np.ndarray:
    """Signed distance-like value -> soft weight in [0, 1] (0.5 on the border)."""
    return np.clip(0.5 + x, 0.0, 1.0)


@dataclass
class _Points:
    """Procedural objects (nuclei, pearls): centres and per-object random numbers."""

    x: np.ndarray
    y: np.ndarray
    r: np.ndarray  # (n, k) uniform [0, 1) attributes

    def take(self, keep: np.ndarray) -> "_Points":
        return _Points(self.x[keep], self.y[keep], self.r[keep])


def _points(x0: float, y0: float, x1: float, y1: float, cell: float, salt: int, jitter: float = 1.0,
            n_attr: int = 6) -> _Points:
    """One candidate object per grid cell overlapping [x0, x1) x [y0, y1), keyed by the cell."""
    ix = np.arange(math.floor(x0 / cell), math.floor(x1 / cell) + 1)
    iy = np.arange(math.floor(y0 / cell), math.floor(y1 / cell) + 1)
    jy, jx = np.meshgrid(iy, ix, indexing="ij")
    jx, jy = jx.ravel(), jy.ravel()
    px = (jx + 0.5 + jitter * (_hash(jx, jy, salt) - 0.5)) * cell
    py = (jy + 0.5 + jitter * (_hash(jx, jy, salt + 1) - 0.5)) * cell
    attrs = np.stack([_hash(jx, jy, salt + 2 + k) for k in range(n_attr)], axis=1) if len(jx) else np.zeros((0, n_attr))
    return _Points(px, py, attrs)


# --------------------------------------------------------------------------------------
# The slide model
# --------------------------------------------------------------------------------------

class DemoSlide:
    """The procedural slide: coarse layout for the whole slide + tile rendering.

    Args:
        width, height: Slide size in level-0 pixels.
        mpp: Microns per pixel (textures have physical sizes; the layout scales with the slide).
        seed: Everything is a function of the seed and the global position.
        labels: Label value of each tissue kind (``glass``, ``tumour``, ``stroma``, ``other``;
            see :func:`helpers.demo.demo_class_names`).
    """

    FIELDS = ("tissue", "muscle", "tumour", "zone", "orient", "stain_h", "stain_e", "hue", "inflam", "light")
    SMOOTH_FIELDS = ("orient", "stain_h", "stain_e", "hue", "inflam", "light")

    def __init__(self, width: int, height: int, mpp: float, seed: int, labels: dict[str, int]):
        self.width, self.height, self.mpp, self.seed = int(width), int(height), float(mpp), int(seed)
        self.labels = labels
        self.size = min(width, height)
        self.um = 1.0 / mpp  # pixels per micron
        # Coarse grid: <= ~1024 points a side, at least every 8 px.
        self.step = max(8, math.ceil(max(width, height) / 1024))
        self.gx = (np.arange(math.ceil(width / self.step)) + 0.5) * self.step
        self.gy = (np.arange(math.ceil(height / self.step)) + 0.5) * self.step
        rng = np.random.default_rng(seed)
        self.salt = int(rng.integers(1, 2**31))
        # Macro geometry (fractions of the slide), jittered by the seed.
        self.centre = (width * (0.5 + rng.uniform(-0.03, 0.03)), height * (0.5 + rng.uniform(-0.03, 0.03)))
        self.radii = (width * rng.uniform(0.40, 0.44), height * rng.uniform(0.37, 0.42))
        self.muscle_dir = rng.uniform(0.15, 0.6) * math.pi  # muscle lies deep, towards this direction
        d = np.array([math.cos(self.muscle_dir), math.sin(self.muscle_dir)])
        main = np.array(self.centre) - d * np.array(self.radii) * 0.18
        self.tumour_centres = [
            (main[0], main[1], 0.30),
            (self.centre[0] + d[0] * self.radii[0] * 0.55, self.centre[1] + d[1] * self.radii[1] * 0.55, 0.13),
            (self.centre[0] - d[1] * self.radii[0] * 0.6, self.centre[1] + d[0] * self.radii[1] * 0.6, 0.10),
        ]
        self.tumour_cell = 17 * self.um  # spacing of tumour cells (one nucleus each)
        self.nest_cell = float(np.clip(self.size / 11, 70 * self.um, 230 * self.um))
        self.layout = self._layout()
        # Sensor grain: a fixed random texture repeated with prime periods (cheap, global).
        self._grain = (rng.random((509, 521), dtype=np.float32) - 0.5) * 5.0

    # ---- layout -------------------------------------------------------------------
    def _noise(self, cell: float, k: int) -> np.ndarray:
        return _grid_noise(self.gx, self.gy, cell, self.salt + 1000 * k)

    def _layout(self) -> dict[str, np.ndarray]:
        """Coarse fields for the whole slide, each roughly a signed distance in pixels."""
        gx, gy = np.meshgrid(self.gx, self.gy)
        cx, cy = self.centre
        rx, ry = self.radii
        s = self.size
        r = np.sqrt(((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2)
        tissue = (1 - r + 0.22 * self._noise(s / 3.5, 1) + 0.07 * self._noise(s / 10, 2)) * 0.42 * s
        d = (math.cos(self.muscle_dir), math.sin(self.muscle_dir))
        depth = ((gx - cx) * d[0] + (gy - cy) * d[1]) / s
        muscle = (depth - 0.06 + 0.10 * self._noise(s / 4, 3) + 0.04 * self._noise(s / 12, 4)) * s
        envelope = np.full(gx.shape, -1.0, np.float32)
        for tx, ty, rad in self.tumour_centres:
            dist = np.sqrt((gx - tx) ** 2 + (gy - ty) ** 2) / s
            envelope = np.maximum(envelope, (rad - dist) / rad)
        envelope = envelope + 0.25 * self._noise(s / 5, 5)
        nests = self._noise(self.nest_cell, 6) + 0.5 * self._noise(self.nest_cell / 2.3, 7)
        # Confluent where the envelope is high, islands at its edge, nothing outside.
        tumour = (0.9 * envelope + 0.6 * nests - 0.5) * self.nest_cell * 0.45
        zone = self._noise(90 * self.um * 4, 8)  # muscle bundle orientation zones
        orient = self._noise(s / 5, 9)  # stroma fibre direction
        stain_h = self._noise(s / 2.5, 10)
        stain_e = self._noise(s / 2.5, 11)
        hue = self._noise(s / 2, 12)
        inflam = self._noise(s / 6, 13)
        light = self._noise(s / 3, 14)
        return {k: np.ascontiguousarray(v, np.float32) for k, v in zip(
            self.FIELDS, (tissue, muscle, tumour, zone, orient, stain_h, stain_e, hue, inflam, light))}

    def sample(self, names: tuple[str, ...], xs: np.ndarray, ys: np.ndarray) -> dict[str, np.ndarray]:
        """Bicubic values of layout fields at level-0 positions (arrays of the same shape)."""
        import cv2

        mx = (np.asarray(xs, np.float64) / self.step - 0.5).astype(np.float32)
        my = (np.asarray(ys, np.float64) / self.step - 0.5).astype(np.float32)
        flat = mx.ndim == 1
        if flat:
            mx, my = mx[None, :], my[None, :]
        out = {}
        for n in names:
            # Cubic where thresholds draw visible borders; linear suffices for slow drifts.
            interp = cv2.INTER_LINEAR if n in self.SMOOTH_FIELDS else cv2.INTER_CUBIC
            v = cv2.remap(self.layout[n], mx, my, interp, borderMode=cv2.BORDER_REPLICATE)
            out[n] = v[0] if flat else v
        return out

    def classify(self, f: dict[str, np.ndarray]) -> np.ndarray:
        """Label per position from the fields (the single definition of the truth)."""
        lab = np.full(f["tissue"].shape, self.labels["glass"], np.uint8)
        tissue = f["tissue"] > 0
        tumour = tissue & (f["tumour"] > 0)
        other = tissue & ~tumour & (f["muscle"] > 0) & (f["tumour"] < -self.halo)
        lab[tissue] = self.labels["stroma"]
        lab[other] = self.labels["other"]
        lab[tumour] = self.labels["tumour"]
        return lab

    @property
    def halo(self) -> float:
        """Desmoplastic stroma kept around tumour nests inside muscle (pixels of the tumour field)."""
        return 25 * self.um

    def coarse_labels(self) -> np.ndarray:
        """The truth on the coarse grid (``step`` level-0 pixels per value)."""
        return self.classify(self.layout)

    # ---- rendering ----------------------------------------------------------------
    def render_labels(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        xs, ys = np.meshgrid(x + np.arange(w) + 0.5, y + np.arange(h) + 0.5)
        return self.classify(self.sample(("tissue", "muscle", "tumour"), xs, ys))

    def render_rgb(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 of the level-0 region (x, y, w, h)."""
        um = self.um
        gxx, gyy = np.meshgrid(x + np.arange(w, dtype=np.float64) + 0.5, y + np.arange(h, dtype=np.float64) + 0.5)
        f = self.sample(self.FIELDS, gxx, gyy)
        gx, gy = gxx.astype(np.float32), gyy.astype(np.float32)
        soft = 2.5 * um  # half-width of soft class borders, in pixels
        w_tis = _smooth01(f["tissue"] / (2 * soft))
        w_tum = _smooth01(f["tumour"] / (2 * soft))
        w_mus = _smooth01(f["muscle"] / (2 * soft)) * _smooth01((-f["tumour"] - self.halo) / (2 * soft)) * (1 - w_tum)
        w_str = np.clip(1 - w_tum - w_mus, 0, 1)
        lab = self.classify(f)
        present = {role: bool((lab == self.labels[role]).any()) for role in ("tumour", "stroma", "other")}
        c_h = np.zeros((h, w), np.float32)
        c_e = np.zeros((h, w), np.float32)
        # Stroma: wavy collagen bundles in three fixed directions, blended by the direction field.
        near = (w_str > 0) & (w_tis > 0)
        if near.any():
            fib = np.zeros((h, w), np.float32)
            warp = 6 * um * _fine_noise(gx, gy, 25 * um, 25 * um, self.salt + 50)
            t = (f["orient"] + 1) * 1.5
            for k in range(3):
                dist = np.abs(t - k)
                wk = np.clip(1 - np.minimum(dist, 3 - dist), 0, 1)
                n = _fine_noise(gx + warp, gy - warp, 45 * um, 4.5 * um, self.salt + 60 + k, _fibre_angle(k))
                n += 0.35 * _fine_noise(gx + warp, gy - warp, 20 * um, 1.4 * um, self.salt + 65 + k, _fibre_angle(k))
                fib += wk * n
            # Crisp bundles with narrow pale gaps between them.
            fib = 1 / (1 + np.exp(-5 * (fib + 0.3)))
            loose = 0.5 + 0.5 * _fine_noise(gx, gy, 60 * um, 60 * um, self.salt + 70)
            ce_str = 0.18 + 0.6 * fib * (0.6 + 0.4 * loose)
            # Retraction clefts: a thin pale gap around tumour nests, as in fixed tissue.
            gap = np.exp(-(((f["tumour"] + 2.5 * um) / (1.5 * um)) ** 2))
            ce_str *= 1 - 0.75 * gap
            c_e += w_str * ce_str
            c_h += w_str * (0.05 + 0.03 * loose)
        if present["tumour"] or (w_tum > 0.01).any():
            cyto = 0.48 + 0.08 * _fine_noise(gx, gy, 5 * um, 5 * um, self.salt + 80)
            m = w_tum > 0
            f1, f2, _ = _voronoi(gx[m], gy[m], self.tumour_cell, self.salt + 200, jitter=0.55)
            cyto[m] += 0.2 * np.exp(-(((f2 - f1) / (0.9 * um)) ** 2)) - 0.06 * np.exp(-(((f2 - f1 - 2.2 * um) / (1.0 * um)) ** 2))
            c_e += w_tum * cyto
            c_h += w_tum * (0.20 + 0.05 * _fine_noise(gx, gy, 12 * um, 12 * um, self.salt + 81))
        c_m = np.zeros((h, w), np.float32)  # muscle and red-cell eosin: redder than collagen
        if present["other"] or (w_mus > 0.01).any():
            ce_mus, ch_mus = self._muscle(gx, gy, f)
            c_m += w_mus * ce_mus
            c_h += w_mus * ch_mus
        self._vessels(x, y, w, h, w_str * w_tis, c_h, c_e, c_m)
        nuc, pearl = self._nuclei(x, y, w, h, f, gx, gy)
        if pearl is not None:  # keratin pearls replace the cells they sit in
            c_e = c_e * (1 - w_tum * pearl[0]) + w_tum * pearl[1]
            c_h = c_h * (1 - 0.8 * w_tum * pearl[0])
        c_h += nuc
        c_h *= w_tis
        c_e *= w_tis
        c_m *= w_tis
        # Stain drift across the slide: strength and hue of both stains.
        c_h *= 1 + 0.22 * f["stain_h"]
        c_e *= 1 + 0.25 * f["stain_e"]
        c_m *= 1 + 0.25 * f["stain_e"]
        hue = np.clip(0.5 + 0.9 * f["hue"], 0, 1)[..., None]
        v_h = (1 - hue) * _H_VEC + hue * _H_VEC_BLUE
        v_e = (1 - hue) * _E_VEC + hue * _E_VEC_RED
        od = c_h[..., None] * v_h + c_e[..., None] * v_e + c_m[..., None] * (0.5 * v_e + 0.5 * _E_VEC_MUSCLE)
        od += 0.012 * w_tis[..., None]  # faint haze of mounting medium over tissue
        # Illumination: near-white glass with a faint vignette, plus sensor noise.
        light = 243 + 4 * f["light"]
        rgb = light[..., None] * np.exp(-od)
        rgb += self._grain[(gyy.astype(np.int64) % 509)[:, :1], (gxx.astype(np.int64) % 521)[:1, :]][..., None]
        return np.clip(rgb, 0, 255).round().astype(np.uint8)

    def _vessels(self, x: int, y: int, w: int, h: int, weight: np.ndarray, c_h: np.ndarray, c_e: np.ndarray,
                 c_m: np.ndarray) -> None:
        """Small blood vessels in the stroma: pale lumen, eosinophilic wall, flat endothelial
        nuclei, some filled with red blood cells (drawn in place into the stain maps)."""
        import cv2

        um = self.um
        margin = 40 * um
        p = _points(x - margin, y - margin, x + w + margin, y + h + margin, 110 * um, self.salt + 800, jitter=0.7,
                    n_attr=8)
        if not len(p.x):
            return
        f = self.sample(("tissue", "muscle", "tumour"), p.x, p.y)
        keep = (self.classify(f) == self.labels["stroma"]) & (f["tumour"] < -15 * um) & (p.r[:, 0] < 0.55)
        keep &= f["tissue"] > 20 * um
        p = p.take(keep)
        if not len(p.x):
            return
        sc = 16
        lumen = np.zeros((h, w), np.float32)
        wall = np.zeros((h, w), np.float32)
        red = np.zeros((h, w), np.float32)
        endo = np.zeros((h, w), np.float32)
        for i in range(len(p.x)):
            a = (6 + 16 * p.r[i, 1]) * um
            b = a * (0.45 + 0.5 * p.r[i, 2])
            ang = float(p.r[i, 3] * 180)
            c = (int((p.x[i] - x) * sc), int((p.y[i] - y) * sc))
            cv2.ellipse(wall, c, (int((a + 2.5 * um) * sc), int((b + 2.5 * um) * sc)), ang, 0, 360, 1.0, -1, cv2.LINE_8, 4)
            cv2.ellipse(lumen, c, (int(a * sc), int(b * sc)), ang, 0, 360, 1.0, -1, cv2.LINE_8, 4)
            rng = np.random.default_rng(int(p.r[i, 4] * 2**31))
            t = np.radians(ang)
            for phi in rng.uniform(0, 2 * np.pi, 2 + int(a / (8 * um))):  # flat endothelial nuclei on the wall
                ex = p.x[i] - x + (a + 1.0 * um) * np.cos(phi) * np.cos(t) - (b + 1.0 * um) * np.sin(phi) * np.sin(t)
                ey = p.y[i] - y + (a + 1.0 * um) * np.cos(phi) * np.sin(t) + (b + 1.0 * um) * np.sin(phi) * np.cos(t)
                tang = np.degrees(np.arctan2(b * np.cos(phi), -a * np.sin(phi)) + t)  # along the wall
                cv2.ellipse(endo, (int(ex * sc), int(ey * sc)), (int(5 * um * sc), int(1.5 * um * sc)), float(tang),
                            0, 360, 1.0, -1, cv2.LINE_8, 4)
            if p.r[i, 5] < 0.7:  # red blood cells packed in the lumen
                n_rbc = int((0.3 + 0.7 * p.r[i, 6]) * a * b / (um * um * 10)) + 1
                for _ in range(n_rbc):
                    rr, th = np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
                    rx = p.x[i] - x + rr * (a * np.cos(th) * np.cos(t) - b * np.sin(th) * np.sin(t))
                    ry = p.y[i] - y + rr * (a * np.cos(th) * np.sin(t) + b * np.sin(th) * np.cos(t))
                    cv2.circle(red, (int(rx * sc), int(ry * sc)), int(3.6 * um * sc), 1.0, -1, cv2.LINE_8, 4)
        if not wall.any():
            return
        wall = cv2.GaussianBlur(wall - lumen, (0, 0), 0.5 * um) * weight
        lumen = cv2.GaussianBlur(lumen, (0, 0), 0.5 * um) * weight
        red = cv2.GaussianBlur(red, (0, 0), 0.6 * um) * lumen
        c_e *= 1 - lumen
        c_h *= 1 - 0.8 * lumen
        c_e += 0.03 * lumen + 0.45 * wall
        c_m += 1.1 * red
        c_h += 1.4 * cv2.GaussianBlur(endo, (0, 0), 0.4 * um) * weight

    def _muscle_kinds(self, zone: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
        """Bundle types by the zone field: (mask, fibre angle, stretch along it); septa at +-0.12."""
        return [(zone > 0.12, 0.0, 1.0), (zone < -0.12, 0.5, 5.0), ((zone >= -0.12) & (zone <= 0.12), 2.0, 5.0)]

    def _muscle_edge(self, gx: np.ndarray, gy: np.ndarray, zone: np.ndarray) -> np.ndarray:
        """Distance (px) to the nearest muscle-fibre boundary at each position (f2 - f1)."""
        out = np.full(gx.shape, np.inf, np.float32)
        for mask, ang, stretch in self._muscle_kinds(zone):
            if not mask.any():
                continue
            ca, sa = math.cos(ang), math.sin(ang)
            mx, my = gx[mask], gy[mask]
            f1, f2, _ = _voronoi((mx * ca + my * sa) / stretch, -mx * sa + my * ca, 55 * self.um,
                                 self.salt + 100 + int(ang * 10))
            out[mask] = f2 - f1
        return out

    def _muscle(self, gx, gy, f) -> tuple[np.ndarray, np.ndarray]:
        """Skeletal muscle: fibre cells (Voronoi) cut across, or stretched along, by zone."""
        um = self.um
        fib_d = 55 * um
        ce = np.zeros(gx.shape, np.float32)
        ch = np.full(gx.shape, 0.05, np.float32)
        zone = f["zone"]
        # Three bundle types: transverse, longitudinal at two angles; septa between them.
        body_noise = _fine_noise(gx, gy, 20 * um, 20 * um, self.salt + 110)
        grain = _fine_noise(gx, gy, 2.5 * um, 2.5 * um, self.salt + 111)
        kinds = self._muscle_kinds(zone)
        for mask, ang, stretch in kinds:
            if not mask.any():
                continue
            ca, sa = math.cos(ang), math.sin(ang)
            mx, my = gx[mask], gy[mask]
            along = mx * ca + my * sa
            f1, f2, ident = _voronoi(along / stretch, -mx * sa + my * ca, fib_d, self.salt + 100 + int(ang * 10))
            edge = np.clip((f2 - f1) / (2.2 * um), 0, 1)  # 0 at the cell boundary
            body = 0.95 + 0.25 * (ident - 0.5) + 0.1 * body_noise[mask] + 0.06 * grain[mask]
            if stretch > 1:  # cross-striations, about every 2.5 um along the fibre
                body = body * (1 + 0.07 * np.sin(along * (2 * math.pi / (2.5 * um))))
            ce[mask] = 0.15 + (body - 0.15) * edge
        septa = np.exp(-((np.abs(zone) - 0.12) / 0.02) ** 2)
        ce = ce * (1 - 0.6 * septa) + 0.25 * septa
        return ce, ch

    def _nuclei(self, x, y, w, h, f, gx, gy) -> tuple[np.ndarray, np.ndarray | None]:
        """Hematoxylin of all nuclei overlapping the region, and the keratin-pearl map."""
        import cv2

        um = self.um
        margin = int(math.ceil(16 * um))
        ox, oy = x - margin, y - margin
        W, H = w + 2 * margin, h + 2 * margin
        canvas = np.zeros((H, W), np.float32)
        shift = 4  # cv2 sub-pixel bits
        sc = 1 << shift

        def draw(p: _Points, a_um, b_um, ang, val):
            for i in range(len(p.x)):
                centre = (int(round((p.x[i] - ox) * sc)), int(round((p.y[i] - oy) * sc)))
                axes = (max(1, int(round(a_um[i] * um * sc))), max(1, int(round(b_um[i] * um * sc))))
                cv2.ellipse(canvas, centre, axes, float(ang[i]), 0, 360, float(val[i]), -1, cv2.LINE_8, shift)

        def where(p: _Points, names=("tissue", "muscle", "tumour", "inflam")):
            return self.sample(names, p.x, p.y) if len(p.x) else {n: np.zeros(0, np.float32) for n in names}

        lab_t, lab_s, lab_o = self.labels["tumour"], self.labels["stroma"], self.labels["other"]
        box = (x - margin, y - margin, x + w + margin, y + h + margin)
        # Tumour: crowded, large, pleomorphic nuclei; some vesicular with nucleoli.
        p = _points(*box, self.tumour_cell, self.salt + 200, jitter=0.55)
        fp = where(p)
        p = p.take(self.classify(fp) == lab_t)
        pearls = _points(*box, 220 * um, self.salt + 300, jitter=0.6)
        fpe = where(pearls)
        pearls = pearls.take((fpe["tumour"] > 22 * um) & (pearls.r[:, 0] < 0.7))
        pearl_map = None
        if len(pearls.x):
            pearl_map = np.zeros((2, h, w), np.float32)  # (inside weight, keratin eosin)
            wobble = 4 * um * _fine_noise(gx, gy, 9 * um, 9 * um, self.salt + 310)
            flakes = _fine_noise(gx, gy, 3 * um, 3 * um, self.salt + 311)
            for i in range(len(pearls.x)):
                rad = (22 + 28 * pearls.r[i, 1]) * um
                d = np.sqrt((gx - pearls.x[i]) ** 2 + ((gy - pearls.y[i]) * (1 + 0.3 * pearls.r[i, 2])) ** 2) + wobble
                inside = np.clip((rad - d) / (4 * um), 0, 1)
                rings = 0.95 + 0.15 * np.cos(d / (1.2 * um)) + 0.12 * flakes
                pearl_map[1] = np.where(inside > pearl_map[0], inside * rings, pearl_map[1])
                pearl_map[0] = np.maximum(pearl_map[0], inside)
            # No nuclei in the middle of a pearl.
            dmin = np.full(len(p.x), np.inf)
            for i in range(len(pearls.x)):
                rad = (22 + 28 * pearls.r[i, 1]) * um
                dmin = np.minimum(dmin, np.hypot(p.x - pearls.x[i], p.y - pearls.y[i]) - rad * 0.8)
            p = p.take(dmin > 0)
        if len(p.x):
            giant = p.r[:, 0] > 0.94
            a = np.where(giant, 9.5 + 3 * p.r[:, 1], 5.2 + 2.6 * p.r[:, 1])
            b = a * (0.62 + 0.33 * p.r[:, 2])
            val = 1.05 + 0.6 * p.r[:, 3] + 0.3 * giant
            draw(p, a, b, p.r[:, 4] * 180, val)
            # Vesicular nuclei: a paler centre with a dark nucleolus.
            ves = p.take(p.r[:, 5] < 0.45)
            if len(ves.x):
                a2 = 0.55 * np.where(ves.r[:, 0] > 0.94, 9.5 + 3 * ves.r[:, 1], 5.2 + 2.6 * ves.r[:, 1])
                draw(ves, a2, a2 * (0.62 + 0.33 * ves.r[:, 2]), ves.r[:, 4] * 180, 0.8 + 0.25 * ves.r[:, 3])
                ones = np.ones(len(ves.x))
                draw(ves, ones, 0.9 * ones, 0 * ones, 2.1 * ones)  # nucleolus
        # Stroma: sparse spindle fibroblast nuclei along the fibres; lymphocytes near tumour.
        p = _points(*box, 26 * um, self.salt + 400, jitter=0.9)
        fp = where(p, ("tissue", "muscle", "tumour", "orient"))
        keep = (self.classify(fp) == lab_s) & (p.r[:, 0] < 0.4)
        p, o = p.take(keep), fp["orient"][keep]
        if len(p.x):
            direction = np.degrees([_fibre_angle(int(k)) for k in np.round((o + 1) * 1.5) % 3])
            draw(p, 5 + 4 * p.r[:, 1], 1.1 + 0.7 * p.r[:, 2], direction + 20 * (p.r[:, 3] - 0.5), 1.25 + 0.3 * p.r[:, 4])
        p = _points(*box, 11 * um, self.salt + 500, jitter=0.9)
        fp = where(p)
        cls = self.classify(fp)
        band = np.exp(-(((fp["tumour"] + 30 * um) / (35 * um)) ** 2))
        prob = 0.004 + 0.22 * band * (cls == lab_s) + 0.1 * np.clip(fp["inflam"] - 0.4, 0, 1)
        keep = ((cls == lab_s) | (cls == lab_t)) & (p.r[:, 0] < prob) & (fp["tissue"] > 0)
        keep &= (cls == lab_s) | (p.r[:, 0] < 0.5 * prob)
        p = p.take(keep)
        if len(p.x):
            r = 2.9 + 0.8 * p.r[:, 1]
            draw(p, r, r * (0.85 + 0.15 * p.r[:, 2]), p.r[:, 3] * 180, 1.9 + 0.3 * p.r[:, 4])
        # Muscle: small flat nuclei at the edge of the fibres.
        p = _points(*box, 16 * um, self.salt + 600, jitter=0.9)
        fp = where(p, ("tissue", "muscle", "tumour", "zone"))
        keep = self.classify(fp) == lab_o
        p, zone = p.take(keep), fp["zone"][keep]
        if len(p.x):
            p = p.take(self._muscle_edge(p.x, p.y, zone) < 3.5 * um)
        if len(p.x):
            draw(p, 3.5 + 2 * p.r[:, 1], 1.2 + 0.5 * p.r[:, 2], p.r[:, 3] * 180, 1.2 + 0.3 * p.r[:, 4])
        canvas = cv2.GaussianBlur(canvas, (0, 0), 0.45 * um)
        nuc = canvas[margin:margin + h, margin:margin + w]
        chromatin = 0.82 + 0.3 * _fine_noise(gx, gy, 1.4 * um, 1.4 * um, self.salt + 700)
        return nuc * chromatin, pearl_map


def _fibre_angle(k: int) -> float:
    """Direction (radians) of stroma fibre family ``k`` of three."""
    return k * math.pi / 3 + 0.3


def _voronoi(u: np.ndarray, v: np.ndarray, cell: float, salt: int,
             jitter: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances from each (u, v) to the nearest and second-nearest site of :func:`_points`,
    and a random number in [0, 1) of the nearest site (a per-cell identity)."""
    iu = np.floor(u / cell).astype(np.int64)
    iv = np.floor(v / cell).astype(np.int64)
    u0, v0 = int(iu.min()) - 1, int(iv.min()) - 1
    nu, nv = int(iu.max()) - u0 + 2, int(iv.max()) - v0 + 2
    jv, ju = np.mgrid[v0:v0 + nv, u0:u0 + nu]
    site_u = ((ju + 0.5 + jitter * (_hash(ju, jv, salt) - 0.5)) * cell).astype(np.float32)
    site_v = ((jv + 0.5 + jitter * (_hash(ju, jv, salt + 1) - 0.5)) * cell).astype(np.float32)
    lu, lv = iu - u0, iv - v0
    site_id = _hash(ju, jv, salt + 2)
    f1 = np.full(u.shape, np.inf, np.float32)
    f2 = np.full(u.shape, np.inf, np.float32)
    ident = np.zeros(u.shape, np.float32)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            d = np.hypot(u - site_u[lv + dv, lu + du], v - site_v[lv + dv, lu + du])
            f2 = np.minimum(f2, np.maximum(f1, d))
            closer = d < f1
            ident = np.where(closer, site_id[lv + dv, lu + du], ident)
            f1 = np.minimum(f1, d)
    return f1, f2, ident

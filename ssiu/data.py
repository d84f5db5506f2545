"""Images for training and evaluating SSIU: embedded photos, image I/O, bicubic LR, datasets.

Pairs of images are kept as uint8 arrays (H, W, 3), the way DIV2K ships them (uint16 for
16-bit greyscale files), and become float32 tensors (3, H, W) in [0, 1] only when a patch
or a validation image is drawn. `read_image` is the one image reader of the package
(training, `ssiu eval`, `ssiu upscale`); see it for EXIF, greyscale, alpha and 16 bits.

Bicubic downsampling (`bicubic_downsample`) uses Pillow's BICUBIC filter on uint8 images.
Like MATLAB's `imresize` (which made the DIV2K/DF2K LR images), Pillow's bicubic is the
Keys cubic with a = -0.5 and, when reducing, widens the kernel by the scale factor
(antialiasing); the result is rounded to uint8 as the DIV2K PNG files are. So LR made on
the fly is close to DIV2K's LR files but not bit-identical (not checked against MATLAB
here; expect differences of about one grey level): MATLAB works in double and mirrors the
image at the borders, Pillow uses fixed-point weights, rounds to 8 bits between its
horizontal and vertical passes, and truncates the kernel at the borders. For numbers
comparable with the paper, train and test on the MATLAB-made LR files (`PairedFolders`).
`torch.nn.functional.interpolate(..., "bicubic", antialias=True)` was not chosen: its
plain bicubic uses a = -0.75, and one uint8 pipeline keeps LR made on the fly in the same
8-bit domain as LR read from disk.

Datasets come in two layers: a *pair source* (`HRFolder`, `PairedFolders`, `InMemoryPairs`)
gives whole (LR, HR) uint8 pairs; `PatchDataset` draws random aligned patches from it and
`ValidationSet` gives whole images or centre crops as tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

# Real RGB photographs shipped inside the scikit-image wheel (skimage/data/), read from disk
# with no network access. name -> (file, what it shows, width x height).
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "astronaut Eileen Collins, NASA portrait, 512x512"),
    "chelsea": ("chelsea.png", "Chelsea the cat, 451x300"),
    "coffee": ("coffee.png", "a cup of coffee on a saucer, 600x400"),
    "rocket": ("rocket.jpg", "Falcon 9 launch, 640x427"),
    "motorcycle": ("motorcycle_left.png", "motorcycle, left view of a stereo pair, 741x500"),
    "hubble_deep_field": ("hubble_deep_field.jpg", "Hubble eXtreme Deep Field, 1000x872"),
    "immunohistochemistry": ("ihc.png", "immunohistochemistry microscopy, 512x512"),
    "retina": ("retina.jpg", "human retina, fundus photograph, 1411x1411"),
}


# ---------------------------------------------------------------------------------------------
# Image I/O and conversions


class ImageReadError(ValueError):
    """A file exists but is not an image Pillow can decode (or has no defined range)."""


class PrecisionWarning(UserWarning):
    """A 16-bit colour PNG read at 8 bits: Pillow decodes only the high byte of each sample."""


# Pillow modes of 16-bit greyscale images, kept at 16 bits.
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientations (tag 0x0112) that swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB (H, W, 3): uint8, or uint16 for 16-bit greyscale files.

    The one reader of training, evaluation and upscaling (`load_image` gives the tensor):

    - EXIF orientation is applied, so camera and phone photos come out upright;
    - greyscale becomes R = G = B; palette images their colours; an alpha channel (RGBA,
      LA, PA) is dropped, not composited over a background;
    - 16-bit greyscale (PNG, TIFF) is kept at 16 bits: uint16 on the file's full 0..65535
      range, whatever values the image happens to use;
    - 16-bit-per-channel colour PNGs: Pillow decodes only the high byte of each sample,
      so they are read at 8 bits, with a `PrecisionWarning`;
    - 32-bit integer and floating-point images have no defined range: ImageReadError.
    """
    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            if _is_16bit_colour_png(image):
                warnings.warn(
                    f"{path} is a 16-bit colour PNG; Pillow reads it at 8 bits per channel "
                    "(16-bit greyscale PNGs keep their 16 bits)",
                    PrecisionWarning,
                    stacklevel=2,
                )
            image.load()
            return _to_rgb_array(ImageOps.exif_transpose(image), path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def _is_16bit_colour_png(image: Image.Image) -> bool:
    raw_modes = [getattr(t, "args", None) or (t[3] if len(t) > 3 else None) for t in image.tile]
    return image.format == "PNG" and any(
        isinstance(m, str) and m.startswith(("RGB;16", "RGBA;16", "LA;16")) for m in raw_modes
    )


def _to_rgb_array(image: Image.Image, path: Path | None = None) -> np.ndarray:
    """A decoded PIL image as RGB (H, W, 3): uint8, or uint16 for 16-bit greyscale."""
    mode = image.mode
    # PNG's deepest greyscale is 16 bits; older Pillow versions open it as mode "I".
    if mode in _GREY16_MODES or (mode == "I" and image.format == "PNG"):
        grey = np.asarray(image).astype(np.uint16)  # I;16B etc. are read in native order
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ImageReadError(
            f"cannot read image {path or ''}: {kind} images have no defined value range; "
            "convert it to an 8- or 16-bit PNG"
        )
    if mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def as_rgb_uint8(image) -> np.ndarray:
    """A PIL image, uint8/uint16/float array (H, W[, C]) or tensor (3, H, W) as uint8
    (H, W, 3) (16-bit values rounded to 8 bits)."""
    a = as_rgb_array(image)
    if a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)
    return a


def as_rgb_array(image) -> np.ndarray:
    """A PIL image, uint8/uint16/float array (H, W[, C]) or tensor (3, H, W) as RGB
    (H, W, 3): uint16 arrays stay uint16, everything else becomes uint8 (floats are
    taken as [0, 1])."""
    if isinstance(image, Image.Image):
        return _to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        return to_uint8(image)
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image (H, W), (H, W, 1|3|4); got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[:, :, :3]
    if a.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(np.round(a * 255.0), 0, 255)
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 or uint16 (H, W, 3) -> float32 (3, H, W) in [0, 1] (divided by 255 or 65535)."""
    a = np.asarray(image)
    if a.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"expected a uint8 or uint16 image array, got {a.dtype}")
    peak = 65535.0 if a.dtype == np.uint16 else 255.0
    planes = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)
    return torch.from_numpy(planes).div_(peak)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3), clamped and rounded (the one
    conversion: images written by upscale, the demo and save_image)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a (3, H, W) RGB image tensor, got {shape}")
    if not image.is_floating_point():
        raise TypeError(f"expected a floating image in [0, 1], got {image.dtype}")
    a = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as float32 RGB (3, H, W) in [0, 1] (`read_image`, then `to_tensor`)."""
    return to_tensor(read_image(path))


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) float tensor in [0, 1] or a uint8 (H, W, 3) array as an image file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = to_uint8(image) if isinstance(image, torch.Tensor) else as_rgb_uint8(image)
    Image.fromarray(array).save(path)
    return path


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; error if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as `read_image` returns it (EXIF orientation applied), read from
    the file header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    return h, w


# ---------------------------------------------------------------------------------------------
# The embedded photographs


def sample_image_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def sample_images(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image, as uint8 RGB (H, W, 3), read offline.

    The photos (see `SAMPLE_PHOTOS`): astronaut, chelsea (a cat), coffee, rocket,
    motorcycle (motorcycle_left.png), hubble_deep_field, immunohistochemistry (ihc.png),
    retina. `names` picks a subset, in the given order.
    """
    names = list(SAMPLE_PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in SAMPLE_PHOTOS]
    if unknown:
        raise ValueError(f"unknown sample photos {unknown}; known: {list(SAMPLE_PHOTOS)}")
    folder = sample_image_dir()
    images = {}
    for name in names:
        path = folder / SAMPLE_PHOTOS[name][0]
        if not path.is_file():
            raise FileNotFoundError(
                f"sample photo {name!r} is not in the installed scikit-image ({path}); "
                "scikit-image >= 0.21 ships it in skimage/data/"
            )
        images[name] = read_image(path)
    return images


# ---------------------------------------------------------------------------------------------
# Bicubic resizing

_BICUBIC = Image.Resampling.BICUBIC


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right of (H, W, C) so that H and W are multiples of `scale`."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H/scale, W/scale, 3), antialiased bicubic (see module doc).

    uint16 images stay uint16: each channel is resized in float by the same filter and
    rounded. H and W must be multiples of `scale` (use `crop_to_multiple`).
    """
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of scale {scale}")
    hr = as_rgb_array(hr)
    size = (w // scale, h // scale)
    if hr.dtype == np.uint16:
        planes = [
            np.asarray(Image.fromarray(hr[:, :, c].astype(np.float32)).resize(size, _BICUBIC))
            for c in range(3)
        ]
        return np.clip(np.round(np.stack(planes, axis=2)), 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(hr).resize(size, _BICUBIC))


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upscaling of float images (3, h, w) or (N, 3, h, w) in [0, 1], the SR baseline.

    Pillow's bicubic (a = -0.5, as MATLAB `imresize`) on each channel in float, so the LR
    is not re-quantised; the result is clamped to [0, 1]. Runs on the CPU; returns a
    tensor on the input's device.
    """
    batched = lr.ndim == 4
    x = lr if batched else lr.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (3, h, w) or (N, 3, h, w), got {tuple(lr.shape)}")
    h, w = x.shape[-2:]
    size = (w * scale, h * scale)
    planes = x.detach().float().cpu().numpy()
    out = np.empty((x.shape[0], 3, h * scale, w * scale), dtype=np.float32)
    for n in range(x.shape[0]):
        for c in range(3):
            plane = Image.fromarray(np.ascontiguousarray(planes[n, c], dtype=np.float32))
            out[n, c] = np.asarray(plane.resize(size, Image.Resampling.BICUBIC))
    y = torch.from_numpy(out).clamp_(0, 1).to(lr.device)
    return y if batched else y[0]


# ---------------------------------------------------------------------------------------------
# Pair sources: whole (LR, HR) uint8 images


class PairSource:
    """Base of the pair sources: `len`, `names`, `sizes` and `pair(i) -> (lr, hr)` uint8."""

    scale: int
    names: list[str]
    lr_sizes: list[tuple[int, int]]  # (h, w) of each LR image, known without decoding

    def __len__(self) -> int:
        return len(self.names)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for i, name in enumerate(self.names):
            yield (name, *self.pair(i))


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    return scale


class InMemoryPairs(PairSource):
    """Pairs made from HR images held in memory (e.g. `sample_images()`), LR by bicubic.

    images: name -> uint8/float array (H, W[, C]), PIL image or (3, H, W) tensor. Each HR is
    cropped to a multiple of `scale` and downsampled once, at construction.
    """

    def __init__(self, images: Mapping[str, object], scale: int):
        self.scale = _check_scale(scale)
        if not images:
            raise ValueError("InMemoryPairs needs at least one image")
        self.names, self._pairs, self.lr_sizes = [], [], []
        for name, image in images.items():
            hr = crop_to_multiple(as_rgb_array(image), scale)
            if min(hr.shape[:2]) < scale:
                raise ValueError(f"image {name!r} is smaller than one LR pixel at x{scale}")
            lr = bicubic_downsample(hr, scale)
            self.names.append(str(name))
            self._pairs.append((lr, hr))
            self.lr_sizes.append(lr.shape[:2])

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._pairs[index]


class HRFolder(PairSource):
    """A folder of HR images; each HR is cropped to a multiple of `scale`, LR made on the fly.

    cache: keep decoded pairs in memory after first use (per process: with DataLoader
    workers, call `preload()` before the workers start so they share it).
    """

    def __init__(self, hr_dir: str | os.PathLike, scale: int, cache: bool = False):
        self.scale = _check_scale(scale)
        self.files = list_images(hr_dir)
        self.names = [p.stem for p in self.files]
        self.lr_sizes = []
        for path in self.files:
            h, w = image_size(path)
            if h < scale or w < scale:
                raise ValueError(f"{path} ({h}x{w}) is smaller than one LR pixel at x{scale}")
            self.lr_sizes.append((h // scale, w // scale))
        self.cache = cache
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cached:
            return self._cached[index]
        hr = crop_to_multiple(read_image(self.files[index]), self.scale)
        result = (bicubic_downsample(hr, self.scale), hr)
        if self.cache:
            self._cached[index] = result
        return result

    def preload(self) -> None:
        self.cache = True
        for i in range(len(self)):
            self.pair(i)


def find_lr_partner(hr_path: Path, lr_files: Mapping[str, Path], scale: int) -> Path | None:
    """The LR file for an HR file: DIV2K's `0001x4.png` for `0001.png`, or the same stem."""
    stem = hr_path.stem
    for key in (f"{stem}x{scale}", f"{stem}X{scale}", stem):
        if key in lr_files:
            return lr_files[key]
    return None


class PairedFolders(HRFolder):
    """HR and LR folders in DIV2K layout: HR `0001.png` pairs with LR `0001x4.png` (x = scale)
    or with a same-name LR file. If `lr_dir` holds no images but an `X4` (`X{scale}`)
    subfolder, that subfolder is used (DIV2K_train_LR_bicubic/X4/).

    Every HR must have an LR partner whose size times `scale` matches the HR, up to the
    `scale - 1` extra rows/columns that DIV2K's HR images may carry (they are cropped).
    """

    def __init__(
        self, hr_dir: str | os.PathLike, lr_dir: str | os.PathLike, scale: int, cache: bool = False
    ):
        self.scale = _check_scale(scale)
        lr_dir = Path(lr_dir)
        sub = lr_dir / f"X{scale}"
        if lr_dir.is_dir() and sub.is_dir() and not _has_images(lr_dir):
            lr_dir = sub
        self.files = list_images(hr_dir)
        lr_files = {p.stem: p for p in list_images(lr_dir)}
        self.lr_files, missing = [], []
        for hr_path in self.files:
            partner = find_lr_partner(hr_path, lr_files, scale)
            if partner is None:
                missing.append(hr_path.name)
            self.lr_files.append(partner)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} HR image(s) in {hr_dir} have no LR partner in {lr_dir} "
                f"(looked for NAMEx{scale}.EXT and NAME.EXT): {shown}"
            )
        self.names = [p.stem for p in self.files]
        self.lr_sizes = []
        for hr_path, lr_path in zip(self.files, self.lr_files, strict=True):
            hh, hw = image_size(hr_path)
            lh, lw = image_size(lr_path)
            if not (0 <= hh - lh * scale < scale and 0 <= hw - lw * scale < scale):
                raise ValueError(
                    f"wrong scale: LR {lr_path.name} is {lh}x{lw} and HR {hr_path.name} is "
                    f"{hh}x{hw}, which is not x{scale} (is --scale right, or the LR folder?)"
                )
            self.lr_sizes.append((lh, lw))
        self.cache = cache
        self._cached = {}

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cached:
            return self._cached[index]
        lr = read_image(self.lr_files[index])
        hr = read_image(self.files[index])[: lr.shape[0] * self.scale, : lr.shape[1] * self.scale]
        if hr.shape[0] != lr.shape[0] * self.scale or hr.shape[1] != lr.shape[1] * self.scale:
            raise ValueError(f"{self.files[index]} changed size since the folder was scanned")
        result = (lr, hr)
        if self.cache:
            self._cached[index] = result
        return result


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def make_pairs(
    hr_dir: str | os.PathLike | None = None,
    lr_dir: str | os.PathLike | None = None,
    scale: int = 4,
    images: Mapping[str, object] | None = None,
    cache: bool = False,
) -> PairSource:
    """The pair source for the given inputs: HR+LR folders, an HR folder, or images in memory."""
    if images is not None:
        if hr_dir is not None or lr_dir is not None:
            raise ValueError("give either in-memory images or folders, not both")
        return InMemoryPairs(images, scale)
    if hr_dir is None:
        if lr_dir is not None:
            raise ValueError("an LR folder needs its HR folder (hr_dir)")
        raise ValueError("no data: give an HR folder (hr_dir) or in-memory images")
    if lr_dir is None:
        return HRFolder(hr_dir, scale, cache=cache)
    return PairedFolders(hr_dir, lr_dir, scale, cache=cache)


# ---------------------------------------------------------------------------------------------
# Patches and validation images


def augment_pair(
    lr: np.ndarray, hr: np.ndarray, hflip: bool, vflip: bool, transpose: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The same flips/transpose on LR and HR (H, W, C) arrays (the dihedral group of 8)."""
    if hflip:
        lr, hr = lr[:, ::-1], hr[:, ::-1]
    if vflip:
        lr, hr = lr[::-1], hr[::-1]
    if transpose:
        lr, hr = lr.transpose(1, 0, 2), hr.transpose(1, 0, 2)
    return lr, hr


class PatchDataset(Dataset):
    """Random aligned patches: LR (3, p, p) and HR (3, p*s, p*s) float32 in [0, 1].

    Index it with `(image_index, sample_id)`: the patch position and the flips/transpose
    then come from `numpy.random.default_rng([seed, sample_id])`, so a batch is the same in
    any process or worker and after a resume (`PatchBatchSampler` yields such keys). A
    plain int index draws them from torch's global generator instead (what a standard
    shuffling DataLoader seeds per worker).

    min_std: reject flat patches: a position whose LR patch has a standard deviation
    below `min_std` (on the 0..255 scale) is drawn again, up to `TRIES` times (the last
    draw is kept). Short runs learn more from textured patches than from sky or the
    black background of astronomy and microscopy images. 0 (default): every draw is kept.
    """

    TRIES = 10

    def __init__(
        self,
        pairs: PairSource,
        patch_size: int = 64,
        augment: bool = True,
        seed=0,
        min_std: float = 0.0,
    ):
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if len(pairs) == 0:
            raise ValueError("the training data has no images")
        small = [
            (n, s) for n, s in zip(pairs.names, pairs.lr_sizes, strict=True) if min(s) < patch_size
        ]
        if small:
            name, (h, w) = min(small, key=lambda t: min(t[1]))
            raise ValueError(
                f"{len(small)} image(s) are smaller than the LR patch {patch_size}x{patch_size}"
                f" at x{pairs.scale}, e.g. {name!r} with LR {h}x{w}; use a smaller patch size"
            )
        self.pairs, self.patch_size, self.augment, self.seed = pairs, patch_size, augment, seed
        self.scale, self.min_std = pairs.scale, float(min_std)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple | list):
            index, sample_id = (int(k) for k in key)
            rng = np.random.default_rng([int(self.seed), sample_id])
            draw = lambda high: int(rng.integers(high))
        else:
            index = int(key)
            draw = lambda high: int(torch.randint(high, ()).item())
        lr, hr = self.pairs.pair(index)
        p, s = self.patch_size, self.scale
        top, left = self._position(lr, draw)
        lr = lr[top : top + p, left : left + p]
        hr = hr[top * s : (top + p) * s, left * s : (left + p) * s]
        if self.augment:
            lr, hr = augment_pair(lr, hr, draw(2) == 1, draw(2) == 1, draw(2) == 1)
        return to_tensor(lr), to_tensor(hr)

    def _position(self, lr: np.ndarray, draw) -> tuple[int, int]:
        """Top-left of the LR patch: the first draw with texture (see `min_std`)."""
        p = self.patch_size
        threshold = self.min_std * (257.0 if lr.dtype == np.uint16 else 1.0)
        for _ in range(self.TRIES if threshold > 0 else 1):
            top, left = draw(lr.shape[0] - p + 1), draw(lr.shape[1] - p + 1)
            if threshold <= 0 or lr[top : top + p, left : left + p].std() >= threshold:
                break
        return top, left


class PatchBatchSampler:
    """Batches of `(image_index, sample_id)` keys for `PatchDataset`, from step `start`.

    Sample j (j = step * batch_size + b) takes image `perm_e[j % n]` of epoch e = j // n,
    perm_e a permutation seeded by (seed, e): each epoch visits every image once, and any
    step's batch depends only on (seed, step), which makes resuming exact.
    `steps=None` runs forever.
    """

    def __init__(self, n_images: int, batch_size: int, seed: int, start: int = 0, steps=None):
        if n_images < 1 or batch_size < 1:
            raise ValueError("PatchBatchSampler needs n_images >= 1 and batch_size >= 1")
        self.n, self.batch_size, self.seed = n_images, batch_size, seed
        self.start, self.steps = start, steps
        self._perm_epoch, self._perm = -1, None

    def image_index(self, j: int) -> int:
        epoch = j // self.n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([int(self.seed), 1, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[j % self.n])

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = step * self.batch_size
        return [(self.image_index(j), j) for j in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while self.steps is None or step < self.steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless PatchBatchSampler has no length")
        return max(self.steps - self.start, 0)


class ValidationSet(Dataset):
    """Validation pairs as tensors: (name, LR (3, h, w), HR (3, h*s, w*s)) float32 in [0, 1].

    crop: if given, the centre `crop` x `crop` of each LR image (smaller sides kept whole)
    and the matching HR region; None keeps whole images.
    """

    def __init__(self, pairs: PairSource, crop: int | None = None):
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
            raise ValueError(f"crop must be a positive int or None, got {crop!r}")
        if len(pairs) == 0:
            raise ValueError("the validation data has no images")
        self.pairs, self.crop, self.scale = pairs, crop, pairs.scale

    @property
    def names(self) -> list[str]:
        return self.pairs.names

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        lr, hr = self.pairs.pair(index)
        if self.crop is not None:
            s, (h, w) = self.scale, lr.shape[:2]
            ch, cw = min(self.crop, h), min(self.crop, w)
            top, left = (h - ch) // 2, (w - cw) // 2
            lr = lr[top : top + ch, left : left + cw]
            hr = hr[top * s : (top + ch) * s, left * s : (left + cw) * s]
        return self.pairs.names[index], to_tensor(lr), to_tensor(hr)

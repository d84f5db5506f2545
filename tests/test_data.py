"""ssiu.data: embedded photos, image I/O, bicubic resizing, pair sources, patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssiu import data

RNG = np.random.default_rng(0)


def write(path, array: np.ndarray, mode: str | None = None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path)
    return path


def random_rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


class NearestPairs(data.PairSource):
    """Pairs whose HR is the LR repeated s x s: any aligned crop/flip keeps HR = up(LR)."""

    def __init__(self, sizes, scale):
        self.scale = scale
        self.names = [f"img{i}" for i in range(len(sizes))]
        self.lr_sizes = list(sizes)
        self._lr = [random_rgb(h, w) for h, w in sizes]

    def pair(self, index):
        lr = self._lr[index]
        return lr, np.repeat(np.repeat(lr, self.scale, 0), self.scale, 1)


# ---------------------------------------------------------------------------------------------
# Embedded photos and I/O


def test_sample_images_are_real_rgb_photos():
    images = data.sample_images()
    assert list(images) == list(data.SAMPLE_PHOTOS)
    assert len(images) >= 6
    for name, image in images.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 300, name
        assert image.std() > 10, name  # not a flat or synthetic image
    assert images["astronaut"].shape == (512, 512, 3)
    assert list(data.sample_images(["chelsea", "coffee"])) == ["chelsea", "coffee"]
    with pytest.raises(ValueError, match="unknown sample photos"):
        data.sample_images(["lena"])


def test_read_image_converts_to_rgb(tmp_path):
    gray = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
    out = data.read_image(write(tmp_path / "g.png", gray))
    assert out.shape == (12, 10, 3) and (out == gray[:, :, None]).all()

    rgba = RNG.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    out = data.read_image(write(tmp_path / "a.png", rgba))
    assert out.shape == (7, 9, 3) and (out == rgba[:, :, :3]).all()

    rgb = random_rgb(5, 6)
    t = data.load_image(write(tmp_path / "c.png", rgb))
    assert t.shape == (3, 5, 6) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    assert (data.to_uint8(t) == rgb).all()
    data.save_image(t, tmp_path / "sub" / "again.png")
    assert (data.read_image(tmp_path / "sub" / "again.png") == rgb).all()


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(data.ImageReadError, match="bad.png"):
        data.read_image(bad)


def png_16bit_rgb(path, array: np.ndarray):
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot): one IDAT, filter 0."""
    import struct
    import zlib

    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_16bit_greyscale_keeps_16_bits(tmp_path):
    # Values up to 1000 only: the range comes from the file's bit depth, not from its max.
    deep = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 50 + 7).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")  # Pillow mode "I;16"
    out = data.read_image(tmp_path / "d16.png")
    assert out.dtype == np.uint16 and out.shape == (4, 5, 3)
    assert (out == deep[:, :, None]).all()
    t = data.load_image(tmp_path / "d16.png")
    torch.testing.assert_close(t[1], torch.from_numpy(deep.astype(np.float32)) / 65535)
    assert data.image_size(tmp_path / "d16.png") == (4, 5)
    # 16 bits travel through the pipeline: bicubic LR stays uint16, tensors scale by 65535.
    big = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(big).save(tmp_path / "ramp.png")
    lr, hr = data.HRFolder(tmp_path, 4).pair(1)
    assert hr.dtype == lr.dtype == np.uint16 and lr.shape == (8, 8, 3)
    assert 0 < lr.min() and lr.max() < 65535 and (lr % 257 != 0).any()  # finer than 8 bits
    assert data.as_rgb_uint8(hr)[0, -1, 0] == 255


def test_16bit_colour_png_is_read_at_8_bits_with_a_warning(tmp_path):
    array = np.array([[[1000, 30000, 65535], [257, 513, 0]]], dtype=np.uint16)
    path = png_16bit_rgb(tmp_path / "rgb16.png", array)
    with pytest.warns(data.PrecisionWarning, match="8 bits"):
        out = data.read_image(path)
    assert out.dtype == np.uint8 and (out == array >> 8).all()  # Pillow keeps the high byte


def test_exif_orientation_is_applied(tmp_path):
    array = random_rgb(2, 3)
    for orientation, expected in ((1, array), (3, array[::-1, ::-1]), (6, np.rot90(array, -1)),
                                  (8, np.rot90(array, 1))):  # fmt: skip
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(array).save(path, exif=exif)
        out = data.read_image(path)
        assert out.shape == expected.shape and (out == expected).all(), orientation
        assert data.image_size(path) == expected.shape[:2]
    # the same through the upscaler's reader
    from ssiu.inference import read_image

    assert read_image(tmp_path / "o6.png").shape == (3, 3, 2)


def test_grey_alpha_palette_and_unsupported_modes(tmp_path):
    rgba = random_rgb(4, 5)
    rgba = np.concatenate([rgba, np.full((4, 5, 1), 10, np.uint8)], axis=2)
    out = data.read_image(write(tmp_path / "rgba.png", rgba))
    assert (out == rgba[:, :, :3]).all()  # alpha dropped, not composited
    la = Image.fromarray(rgba[:, :, 0]).convert("LA")
    la.save(tmp_path / "la.png")
    assert (data.read_image(tmp_path / "la.png") == rgba[:, :, :1]).all()
    Image.fromarray(random_rgb(4, 5)).convert("P").save(tmp_path / "p.png")
    assert data.read_image(tmp_path / "p.png").shape == (4, 5, 3)
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(data.ImageReadError, match="floating-point"):
        data.read_image(tmp_path / "f.tiff")
    Image.fromarray(np.zeros((3, 3), np.int32)).save(tmp_path / "i.tiff")
    with pytest.raises(data.ImageReadError, match="32-bit integer"):
        data.read_image(tmp_path / "i.tiff")


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images in"):
        data.list_images(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bicubic


def test_bicubic_downsample():
    hr = random_rgb(24, 36)
    lr = data.bicubic_downsample(hr, 3)
    assert lr.shape == (8, 12, 3) and lr.dtype == np.uint8
    expected = np.asarray(Image.fromarray(hr).resize((12, 8), Image.Resampling.BICUBIC))
    assert (lr == expected).all()
    flat = np.full((16, 16, 3), 77, np.uint8)
    assert (data.bicubic_downsample(flat, 4) == 77).all()
    with pytest.raises(ValueError, match="not a multiple"):
        data.bicubic_downsample(random_rgb(10, 12), 4)
    assert data.crop_to_multiple(random_rgb(37, 50), 4).shape == (36, 48, 3)


def test_bicubic_upsample():
    lr = torch.rand(2, 3, 5, 7)
    up = data.bicubic_upsample(lr, 4)
    assert up.shape == (2, 3, 20, 28) and up.dtype == torch.float32
    assert 0 <= up.min() and up.max() <= 1
    assert torch.equal(data.bicubic_upsample(lr[1], 4), up[1])
    flat = torch.full((3, 6, 6), 0.25)
    assert torch.allclose(data.bicubic_upsample(flat, 2), torch.full((3, 12, 12), 0.25))


# ---------------------------------------------------------------------------------------------
# Pair sources


def test_hr_folder_crops_to_multiple_and_makes_lr(tmp_path):
    write(tmp_path / "b.png", random_rgb(37, 50))
    write(tmp_path / "a.jpg", random_rgb(40, 40))
    pairs = data.HRFolder(tmp_path, 4)
    assert pairs.names == ["a", "b"]
    assert pairs.lr_sizes == [(10, 10), (9, 12)]
    lr, hr = pairs.pair(1)
    assert hr.shape == (36, 48, 3) and lr.shape == (9, 12, 3)
    assert (lr == data.bicubic_downsample(hr, 4)).all()


def test_paired_folders_div2k_layout(tmp_path):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR" / "X2"
    hr_dir.mkdir()
    lr_dir.mkdir(parents=True)
    hr1, hr2 = random_rgb(20, 24), random_rgb(21, 17)  # hr2 has one extra row/column
    write(hr_dir / "0001.png", hr1)
    write(hr_dir / "0002.png", hr2)
    lr1, lr2 = random_rgb(10, 12), random_rgb(10, 8)
    write(lr_dir / "0001x2.png", lr1)
    write(lr_dir / "0002x2.png", lr2)
    pairs = data.PairedFolders(hr_dir, tmp_path / "LR", 2)  # finds the X2 subfolder
    assert pairs.names == ["0001", "0002"]
    lr, hr = pairs.pair(1)
    assert (lr == lr2).all() and (hr == hr2[:20, :16]).all()
    assert data.make_pairs(hr_dir, lr_dir, 2).lr_sizes == [(10, 12), (10, 8)]


def test_paired_folders_same_names(tmp_path):
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    write(tmp_path / "hr" / "cat.png", random_rgb(12, 12))
    write(tmp_path / "lr" / "cat.png", random_rgb(4, 4))
    pairs = data.PairedFolders(tmp_path / "hr", tmp_path / "lr", 3)
    assert pairs.pair(0)[1].shape == (12, 12, 3)


def test_paired_folders_errors(tmp_path):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    write(hr_dir / "0001.png", random_rgb(16, 16))
    write(hr_dir / "0002.png", random_rgb(16, 16))
    write(lr_dir / "0001x4.png", random_rgb(4, 4))
    with pytest.raises(FileNotFoundError, match="no LR partner.*0002.png"):
        data.PairedFolders(hr_dir, lr_dir, 4)
    write(lr_dir / "0002x4.png", random_rgb(8, 8))
    with pytest.raises(ValueError, match="wrong scale"):
        data.PairedFolders(hr_dir, lr_dir, 4)
    with pytest.raises(FileNotFoundError, match="no LR partner"):
        data.PairedFolders(hr_dir, lr_dir, 2)  # looks for 0001x2.png
    with pytest.raises(ValueError, match="needs its HR folder"):
        data.make_pairs(None, lr_dir, 4)
    with pytest.raises(ValueError, match="no data"):
        data.make_pairs(None, None, 4)


def test_in_memory_pairs():
    images = {"x": random_rgb(30, 41), "y": torch.rand(3, 16, 16)}
    pairs = data.InMemoryPairs(images, 2)
    assert pairs.lr_sizes == [(15, 20), (8, 8)]
    assert pairs.pair(0)[1].shape == (30, 40, 3)
    assert [name for name, _, _ in pairs] == ["x", "y"]
    with pytest.raises(ValueError, match="at least one"):
        data.InMemoryPairs({}, 2)


# ---------------------------------------------------------------------------------------------
# Patches


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_patches_sizes_and_lr_hr_consistency(scale):
    pairs = NearestPairs([(20, 25), (16, 30)], scale)
    patches = data.PatchDataset(pairs, patch_size=8, seed=3)
    seen = set()
    for sample in range(40):
        lr, hr = patches[(sample % 2, sample)]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 8 * scale, 8 * scale)
        up = lr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        assert torch.equal(up, hr)  # flips/transposes applied alike, patch aligned
        seen.add(tuple(lr.flatten()[:8].tolist()))
    assert len(seen) > 30  # positions and flips vary


def test_augmentation_applies_all_eight_dihedral_variants():
    pairs = NearestPairs([(8, 8)], 2)
    patches = data.PatchDataset(pairs, patch_size=8, seed=0)
    lr0 = data.to_tensor(pairs.pair(0)[0])
    variants = {patches[(0, j)][0].numpy().tobytes() for j in range(200)}
    expected = set()
    for k in range(4):
        rot = torch.rot90(lr0, k, (1, 2))
        expected |= {rot.numpy().tobytes(), rot.flip(2).numpy().tobytes()}
    assert variants == expected
    plain = data.PatchDataset(pairs, patch_size=8, augment=False)
    assert torch.equal(plain[(0, 5)][0], lr0)


def test_patches_are_keyed_by_sample_not_by_process():
    pairs = NearestPairs([(30, 30)] * 3, 2)
    a = data.PatchDataset(pairs, 8, seed=1)
    b = data.PatchDataset(pairs, 8, seed=1)
    assert torch.equal(a[(2, 17)][0], b[(2, 17)][0])
    assert not torch.equal(a[(2, 17)][0], data.PatchDataset(pairs, 8, seed=2)[(2, 17)][0])
    torch.manual_seed(0)
    lr, hr = a[1]  # plain int index: torch's generator
    assert lr.shape == (3, 8, 8) and hr.shape == (3, 16, 16)


def test_loader_workers_do_not_change_batches():
    pairs = NearestPairs([(20, 20)] * 5, 2)
    patches = data.PatchDataset(pairs, 8, seed=4)

    def batches(workers):
        sampler = data.PatchBatchSampler(5, 3, seed=4, start=2, steps=6)
        loader = DataLoader(patches, batch_sampler=sampler, num_workers=workers)
        return [lr for lr, _ in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == 4
    assert all(torch.equal(x, y) for x, y in zip(zero, two, strict=True))


def test_patch_batch_sampler():
    sampler = data.PatchBatchSampler(5, 2, seed=7, steps=10)
    keys = [k for batch in sampler for k in batch]
    assert [j for _, j in keys] == list(range(20))
    for epoch in range(4):
        assert sorted(i for i, _ in keys[epoch * 5 : epoch * 5 + 5]) == [0, 1, 2, 3, 4]
    later = data.PatchBatchSampler(5, 2, seed=7, start=6, steps=10)
    assert list(later) == list(sampler)[6:] and len(later) == 4
    assert list(data.PatchBatchSampler(5, 2, seed=8, steps=10)) != list(sampler)


def test_patch_errors():
    pairs = NearestPairs([(20, 25), (10, 30)], 2)
    with pytest.raises(ValueError, match="smaller than the LR patch 16x16.*img1"):
        data.PatchDataset(pairs, 16)
    with pytest.raises(ValueError, match="patch_size"):
        data.PatchDataset(pairs, 0)


def test_validation_set_crops_align():
    pairs = NearestPairs([(20, 30), (6, 40)], 3)
    full = data.ValidationSet(pairs)
    name, lr, hr = full[0]
    assert name == "img0" and lr.shape == (3, 20, 30) and hr.shape == (3, 60, 90)
    crop = data.ValidationSet(pairs, crop=10)
    _, lr, hr = crop[0]
    assert lr.shape == (3, 10, 10) and hr.shape == (3, 30, 30)
    assert torch.equal(lr.repeat_interleave(3, 1).repeat_interleave(3, 2), hr)
    assert torch.equal(lr, full[0][1][:, 5:15, 10:20])
    _, lr, hr = crop[1]  # a side shorter than the crop is kept whole
    assert lr.shape == (3, 6, 10) and hr.shape == (3, 18, 30)


def test_flat_patches_are_redrawn():
    # Left half flat grey, right half noise: with min_std every patch has texture.
    hr = np.full((64, 128, 3), 90, np.uint8)
    hr[:, 64:] = random_rgb(64, 64)
    pairs = data.InMemoryPairs({"half": hr}, 2)
    plain = data.PatchDataset(pairs, 8, augment=False, seed=3)
    textured = data.PatchDataset(pairs, 8, augment=False, seed=3, min_std=8)
    stds = lambda ds: [ds[(0, j)][0].std().item() * 255 for j in range(40)]  # noqa: E731
    assert min(stds(plain)) < 1  # some draws land on the flat half
    assert min(stds(textured)) >= 8
    # Deterministic, and without min_std the draws are unchanged (one try per patch).
    assert torch.equal(textured[(0, 5)][1], textured[(0, 5)][1])
    key = (0, 7)
    assert torch.equal(plain[key][0], data.PatchDataset(pairs, 8, augment=False, seed=3)[key][0])

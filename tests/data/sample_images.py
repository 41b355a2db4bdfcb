"""Test images written with Pillow: every mode, EXIF orientations, and broken files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps plus a little noise: a photo-like uint8 RGB image that JPEG keeps
    close, different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6, 3)
    channels = [np.sin(x / width * (2 + c) + phase[c]) * np.cos(y / height * (1 + c))
                for c in range(3)]
    image = np.stack(channels, -1) * 100 + 128 + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def blocks(height: int, width: int) -> np.ndarray:
    """Four flat quadrants (red, green, blue, white) with a black top-left marker: any
    rotation or flip is obvious, and JPEG keeps flat areas nearly exact."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = (255, 0, 0)
    image[:h, w:] = (0, 255, 0)
    image[h:, :w] = (0, 0, 255)
    image[h:, w:] = (255, 255, 255)
    image[: h // 2, : w // 2] = 0
    return image


def save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def save_oriented(upright: np.ndarray, path: Path, orientation: int, **options) -> Path:
    """Store ``upright`` so that a viewer applying the EXIF ``orientation`` shows it upright
    (the stored pixels are the inverse transform of the upright image)."""
    inverse = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
               4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
               6: lambda a: np.rot90(a, 1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
               8: lambda a: np.rot90(a, -1)}
    stored = np.ascontiguousarray(inverse[orientation](upright))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **options)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` and that holds no pixel data: a
    decoder that reads past the header fails, so refusing it proves the header check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def jpeg_with_size(path: Path, width: int, height: int) -> Path:
    """A real small JPEG whose frame header is patched to claim ``width`` x ``height``."""
    save(pattern(16, 16), path, format="JPEG")
    data = bytearray(path.read_bytes())
    at = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def every_kind(folder: Path, size: int = 64) -> dict[str, Path]:
    """One file of each kind the decoders must handle, good and bad, by name."""
    rgb = pattern(size, size, seed=1)
    files = {
        "rgb.jpg": save(rgb, folder / "rgb.jpg", quality=95),
        "gray.jpg": save(rgb[..., 0], folder / "gray.jpg", quality=95),
        "alpha.png": save(np.dstack([rgb, np.full((size, size), 128, np.uint8)]),
                          folder / "alpha.png"),
        "sixteen.png": folder / "sixteen.png",
        "palette.gif": folder / "palette.gif",
        "cmyk.jpg": folder / "cmyk.jpg",
        "rotated.jpg": save_oriented(blocks(size, size), folder / "rotated.jpg", 6,
                                     quality=95),
    }
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(files["sixteen.png"])
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette.gif"])
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk.jpg"], quality=95)
    jpeg = (folder / "rgb.jpg").read_bytes()
    bad = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        files[name] = folder / name
    files["huge.png"] = png_header_only(folder / "huge.png", 20_000, 20_000)
    return files

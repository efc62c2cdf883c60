"""Draw the calibration set's reference images (128x128 PNGs) procedurally; flux2lab releases them under CC0.

Run from anywhere: `python calibration_data/make_refs.py`. The drawing is deterministic, so the files are
reproducible byte for byte with the same Pillow version.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
OUT = Path(__file__).resolve().parent / "refs"


def gradient(a: tuple[int, int, int], b: tuple[int, int, int], vertical: bool = True) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    for i in range(SIZE):
        for j in range(SIZE):
            t = (j if vertical else i) / (SIZE - 1)
            px[i, j] = tuple(round(a[c] + (b[c] - a[c]) * t) for c in range(3))
    return img


def red_circle() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (245, 240, 230))
    ImageDraw.Draw(img).ellipse((24, 24, 104, 104), fill=(200, 30, 40))
    return img


def blue_square() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    ImageDraw.Draw(img).rectangle((32, 32, 96, 96), fill=(30, 70, 200))
    return img


def green_triangle() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (235, 235, 220))
    ImageDraw.Draw(img).polygon([(64, 16), (112, 108), (16, 108)], fill=(40, 150, 60))
    return img


def yellow_star() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (20, 25, 60))
    points = []
    for k in range(10):
        r = 52 if k % 2 == 0 else 22
        a = math.pi / 2 + k * math.pi / 5
        points.append((64 + r * math.cos(a), 64 - r * math.sin(a)))
    ImageDraw.Draw(img).polygon(points, fill=(250, 210, 40))
    return img


def checkerboard() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(8):
        for j in range(8):
            if (i + j) % 2:
                draw.rectangle((i * 16, j * 16, i * 16 + 15, j * 16 + 15), fill=(20, 20, 20))
    return img


def stripes() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    colours = [(230, 60, 50), (250, 160, 40), (250, 230, 60), (70, 180, 80), (50, 120, 220), (130, 70, 180)]
    for k in range(SIZE // 16 + 1):
        draw.rectangle((0, k * 16, SIZE, k * 16 + 15), fill=colours[k % len(colours)])
    return img


def sunset() -> Image.Image:
    img = gradient((250, 120, 60), (60, 30, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((44, 70, 84, 110), fill=(255, 220, 120))
    draw.rectangle((0, 96, SIZE, SIZE), fill=(30, 30, 50))
    return img


def sky_gradient() -> Image.Image:
    return gradient((120, 180, 250), (240, 250, 255))


def concentric_rings() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, r in enumerate(range(60, 0, -10)):
        fill = (200, 40, 40) if k % 2 == 0 else (255, 255, 255)
        draw.ellipse((64 - r, 64 - r, 64 + r, 64 + r), fill=fill)
    return img


def house() -> Image.Image:
    img = gradient((150, 200, 250), (200, 230, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 100, SIZE, SIZE), fill=(80, 160, 70))
    draw.rectangle((36, 60, 92, 104), fill=(210, 180, 140))
    draw.polygon([(28, 62), (64, 30), (100, 62)], fill=(150, 40, 40))
    draw.rectangle((58, 80, 70, 104), fill=(90, 60, 30))
    return img


def pattern_dots() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (240, 230, 250))
    draw = ImageDraw.Draw(img)
    for i in range(6):
        for j in range(6):
            x, y = 12 + i * 21, 12 + j * 21
            draw.ellipse((x - 6, y - 6, x + 6, y + 6), fill=(120 + 20 * i, 40, 200 - 25 * j))
    return img


def smiley() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse((14, 14, 114, 114), fill=(255, 215, 0), outline=(0, 0, 0), width=3)
    draw.ellipse((42, 42, 54, 58), fill=(0, 0, 0))
    draw.ellipse((74, 42, 86, 58), fill=(0, 0, 0))
    draw.arc((36, 50, 92, 96), start=20, end=160, fill=(0, 0, 0), width=4)
    return img


DRAWINGS = {
    "red_circle": red_circle, "blue_square": blue_square, "green_triangle": green_triangle,
    "yellow_star": yellow_star, "checkerboard": checkerboard, "stripes": stripes, "sunset": sunset,
    "sky_gradient": sky_gradient, "concentric_rings": concentric_rings, "house": house,
    "pattern_dots": pattern_dots, "smiley": smiley,
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, draw in DRAWINGS.items():
        draw().save(OUT / f"{name}.png", optimize=True)
    print(f"wrote {len(DRAWINGS)} images to {OUT}")


if __name__ == "__main__":
    main()

"""Draws docs/template.png: the aligned crop, dlib's 5 landmark targets and the landmark masker's face region."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from revanon_rt.faces import TEMPLATE_5, template_region

SIZE = 256
region = template_region(SIZE, out=SIZE)
im = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
pixels = np.asarray(im).copy()
pixels[region > 0] = (180, 220, 180)
im = Image.fromarray(pixels)
draw = ImageDraw.Draw(im)
for k in range(1, 4):
    draw.line([(k * SIZE // 4, 0), (k * SIZE // 4, SIZE)], fill=(210, 210, 210))
    draw.line([(0, k * SIZE // 4), (SIZE, k * SIZE // 4)], fill=(210, 210, 210))
labels = ["R eye outer", "R eye inner", "L eye outer", "L eye inner", "nose base"]
for (x, y), label, colour in zip(TEMPLATE_5 * SIZE, labels, [(200, 40, 40)] * 4 + [(40, 40, 200)]):
    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
draw.text((6, 4), "5-point targets, face region", fill=(60, 60, 60))
draw.rectangle([0, 0, SIZE - 1, SIZE - 1], outline=(120, 120, 120))
im.save(Path(__file__).with_name("template.png"))

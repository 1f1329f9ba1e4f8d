"""Print how far one image is from another (same size): max |diff| in 1/255 steps and PSNR.
    python bench/scripts/image_diff.py REFERENCE.png OTHER.png [LABEL]"""
import sys

import numpy as np
from PIL import Image

a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in sys.argv[1:3])
label = sys.argv[3] if len(sys.argv) > 3 else f"{sys.argv[2]} vs {sys.argv[1]}"
mse = float(np.mean((a - b) ** 2))
print(f"{label}: max |diff| {np.abs(a - b).max():.0f}/255, "
      f"PSNR {10 * np.log10(255**2 / mse) if mse else float('inf'):.1f} dB")

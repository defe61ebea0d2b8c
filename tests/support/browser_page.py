"""Reading the viewer page in a browser test: the counters the player and the audio
path publish on ``window``, and what the player drew (its video canvas scaled down and
read back as grey levels, to check a picture is there: not blank, not one flat colour)."""

from __future__ import annotations

from typing import Any


def read_fields_script(global_name: str) -> str:
    """A function for ``page.evaluate(script, fields)``: those fields of
    ``window[global_name]`` as an object, or null before the page's script made it."""
    return (
        f"(fields) => {{ const s = window.{global_name}; if (!s) return null;"
        " const o = {}; for (const f of fields) o[f] = s[f]; return o; }"
    )


# Rec. 601 luma weights, and the plain mean of red, green and blue.
LUMA = (0.299, 0.587, 0.114)
MEAN = (1 / 3, 1 / 3, 1 / 3)

# The player's canvas scaled down to w x h; each pixel's weighted sum of R, G and B,
# rounded, as a flat list.
SAMPLE_CANVAS = """
([w, h, k]) => {
  const src = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = w; c.height = h;
  const g = c.getContext('2d', { willReadFrequently: true });
  g.drawImage(src, 0, 0, w, h);
  const d = g.getImageData(0, 0, w, h).data;
  const out = new Array(w * h);
  for (let i = 0, j = 0; i < d.length; i += 4, j++) {
    out[j] = Math.round(k[0] * d[i] + k[1] * d[i + 1] + k[2] * d[i + 2]);
  }
  return out;
}
"""


def sample_canvas(
    page: Any, width: int, height: int, weights: tuple[float, float, float] = LUMA
) -> list[int]:
    """The page's video canvas scaled down to ``width`` x ``height``, as grey levels
    (0-255) weighted by ``weights``, row by row."""
    sample: list[int] = page.evaluate(SAMPLE_CANVAS, [width, height, list(weights)])
    return sample

"""Heatmaps as hand-built inline SVG: one <rect class="cell"> per value with a tooltip, so that a
script can link the same cell across maps (matplotlib draws a grid as one image)."""

from collections.abc import Callable, Sequence

import numpy as np

from madlens.report.page import esc

# Hovering a cell outlines the cell with the same key in every map; the body records how many
# cells and maps were drawn (what a test in a real browser reads back).
HEATMAP_JS = """
(function(){
  var cells=document.querySelectorAll('rect.cell');
  cells.forEach(function(c){
    c.addEventListener('mouseenter',function(){
      var key=c.getAttribute('data-key');
      document.querySelectorAll('rect.cell[data-key="'+key+'"]').forEach(function(o){
        o.classList.add('hl');});});
    c.addEventListener('mouseleave',function(){
      document.querySelectorAll('rect.cell.hl').forEach(function(o){o.classList.remove('hl');});
    });
  });
  document.body.setAttribute('data-cells',String(cells.length));
  document.body.setAttribute('data-maps',String(document.querySelectorAll('svg.heatmap').length));
})();
"""


def heatmap(
    values: Sequence[Sequence[float]] | np.ndarray,
    title: str,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    colour: Callable[[float], str],
    legend: str = "",
    outlined: dict[tuple[int, int], str] | None = None,
    keyed: bool = True,
    cell: int = 14,
    cell_w: int | None = None,
) -> str:
    """A titled heatmap of `values` (rows x columns) filled by `colour(value)`. Cells in
    `outlined` get a border of the given colour; `keyed` cells carry `data-key="i.j"` (linked
    across maps by `HEATMAP_JS`); every cell has a tooltip with its labels and value."""
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    cw = cell_w or cell
    left, top = max(34, 6 * max((len(label) for label in row_labels), default=0) + 8), 22
    width, height = left + cols * cw + 4, top + rows * cell + 4
    parts = [
        f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
    ]
    for j in range(0, cols, max(1, cols // 12)):
        parts.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 6}" font-size="9" '
                     f'text-anchor="middle">{esc(col_labels[j])}</text>')  # fmt: skip
    for i in range(rows):
        y = top + i * cell
        if rows <= 16 or i % 2 == 0:
            parts.append(f'<text x="{left - 4}" y="{y + cell * 0.75}" font-size="9" '
                         f'text-anchor="end">{esc(row_labels[i])}</text>')  # fmt: skip
        for j in range(cols):
            v = float(values[i, j])
            key = f' data-key="{i}.{j}"' if keyed else ""
            shown = "n/a" if v != v else f"{v:.3f}"
            parts.append(
                f'<rect class="cell"{key} x="{left + j * cw}" y="{y}" width="{cw}" '
                f'height="{cell}" fill="{colour(v)}"><title>{esc(row_labels[i])} '
                f"{esc(col_labels[j])}: {shown}</title></rect>"
            )
    for (i, j), stroke in (outlined or {}).items():
        parts.append(
            f'<rect x="{left + j * cw + 1}" y="{top + i * cell + 1}" width="{cw - 2}" '
            f'height="{cell - 2}" fill="none" stroke="{stroke}" stroke-width="2"/>'
        )
    parts.append("</svg>")
    note = f'<div class="note">{esc(legend)}</div>' if legend else ""
    return f'<div class="map"><div class="title">{esc(title)}</div>{"".join(parts)}{note}</div>'

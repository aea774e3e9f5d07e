"""The page shell of every madlens report: escaping, the one stylesheet, pass/fail marks, number
formatting and a self-contained HTML document (inline CSS, SVG and script; nothing fetched)."""

import html
import json
import math
from typing import Any

PASS, FAIL = "pass", "fail"  # the CSS classes of a met / missed target, in every report

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.15em;border-bottom:1px solid #ccc;
padding-bottom:.2em;margin-top:2em}h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f4f4f4}th[colspan]{text-align:center}
td.l,th.l,table.text td,table.text th{text-align:left}
.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
.muted,.note{color:#666;font-size:.85em}.note{max-width:900px}.sub{color:#555;font-size:.8em}
.apart{border-left:3px solid #999}
.plots,.grid{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.plot{border:1px solid #eee;padding:.4em}.plot>div:first-child{font-weight:600}
.figures{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.figure{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.figure b{display:block;font-size:20px}.figure span{font-size:12px;color:#555}
.map{font-size:12px}.map .title{font-weight:600;margin-bottom:4px;max-width:260px}
rect.cell.hl{stroke:#000;stroke-width:2}svg text{font-family:sans-serif}
"""

# The browser-side twin of `esc`, for reports that draw from embedded JSON.
ESCAPE_JS = (
    'const esc = s => String(s).replace(/&/g,"&amp;").replace(/</g,"&lt;")'
    '.replace(/>/g,"&gt;").replace(/"/g,"&quot;");\n'
)


def esc(x: Any) -> str:
    """`x` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(x))


def fmt(x: float | None, digits: int = 3) -> str:
    """`x` with `digits` decimals, or "n/a" when missing or not finite."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def verdict(ok: bool | None, yes: str = "met", no: str = "not met") -> str:
    """A target's verdict: green `yes`, red `no`, or muted "reported" when there is no target."""
    if ok is None:
        return "<span class='muted'>reported</span>"
    return (
        f"<span class='{PASS}'>{esc(yes)}</span>"
        if ok
        else f"<span class='{FAIL}'>{esc(no)}</span>"
    )


def figure(value: str, label: str, ok: bool | None = None) -> str:
    """A headline number in a box, green / red when it is a verdict."""
    css = "" if ok is None else PASS if ok else FAIL
    return f'<div class="figure"><b class="{css}">{esc(value)}</b><span>{esc(label)}</span></div>'


def json_script(data: Any, element_id: str) -> str:
    """`data` embedded as a JSON script element that no string inside it can close."""
    text = json.dumps(data, separators=(",", ":"))
    # JSON escapes of <, > and & (valid inside JSON strings, the only place they occur)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script id="{esc(element_id)}" type="application/json">{text}</script>'


def page(title: str, body: str, *, css: str = "", script: str = "") -> str:
    """A self-contained HTML document: the shared stylesheet plus `css`, `body`, then `script`
    (run after the body is parsed). Nothing is fetched when it opens."""
    tail = f"<script>\n{script}</script>\n" if script else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title>\n<style>{CSS}{css}</style></head>\n"
        f"<body>\n{body}\n{tail}</body></html>\n"
    )

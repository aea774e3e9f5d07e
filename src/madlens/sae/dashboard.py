"""Feature dashboards: per-latent statistics over corpus windows (top-activating contexts,
quantile groups, activation histogram, density, logit effects) as one self-contained HTML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madlens.report import ESCAPE_JS, HISTOGRAM_JS, esc, json_script, page
from madlens.sae.base import SparseAutoencoder
from madlens.sae.topk import TopKSAE

CONTEXT = 6  # tokens shown on each side of the activating token


@dataclass
class FeatureStats:
    """What the dashboard shows: per feature its density, top contexts, quantile-group
    contexts, activation histogram and top / bottom logit effects."""

    density: np.ndarray
    top: list[list[tuple[int, int, float]]]  # per feature: (window, position, activation)
    groups: list[list[tuple[str, list[tuple[int, int, float]]]]]
    histograms: list[dict[str, Any]]
    logits_up: list[list[tuple[int, float]]]
    logits_down: list[list[tuple[int, float]]]
    tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def firing_triplets(
    sae: SparseAutoencoder, rows: np.ndarray, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(row, feature, activation)` of every firing latent over `rows` (sparse), encoded on
    the SAE's device."""
    out_rows, out_feat, out_val = [], [], []
    device = sae.W_enc.device
    for start in range(0, len(rows), batch):
        x = torch.as_tensor(np.asarray(rows[start : start + batch], dtype=np.float32)).to(device)
        if isinstance(sae, TopKSAE):
            index, values = sae.topk(x)
            row = torch.arange(len(x), device=device)[:, None].expand_as(index)
            keep = values > 0
            r, f, v = row[keep], index[keep], values[keep]
        else:
            latents = sae.encode(x)
            r, f = torch.nonzero(latents > 0, as_tuple=True)
            v = latents[r, f]
        out_rows.append(r.cpu().numpy() + start)
        out_feat.append(f.cpu().numpy())
        out_val.append(v.cpu().numpy())
    return np.concatenate(out_rows), np.concatenate(out_feat), np.concatenate(out_val)


def logit_effects(
    sae: SparseAutoencoder, model: Any, top: int = 8
) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
    """Each decoder direction through the final norm's gain and the unembedding: the tokens
    whose logits a feature raises and lowers most."""
    hf = model.hf_model
    unembed = hf.get_output_embeddings().weight.detach().float()  # (vocab, d_model)
    norm = getattr(getattr(hf, "model", hf), "norm", None)
    gain = norm.weight.detach().float() if norm is not None and hasattr(norm, "weight") else 1.0
    up, down = [], []
    with torch.no_grad():
        for start in range(0, sae.d_sae, 512):
            directions = sae.W_dec[start : start + 512].float().to(unembed.device)
            effects = (directions * gain) @ unembed.T
            hi = effects.topk(top, dim=-1)
            lo = effects.topk(top, dim=-1, largest=False)
            up += [list(zip(i.tolist(), v.tolist())) for i, v in zip(hi.indices, hi.values)]
            down += [list(zip(i.tolist(), v.tolist())) for i, v in zip(lo.indices, lo.values)]
    return up, down


def feature_stats(
    sae: SparseAutoencoder,
    rows: np.ndarray,
    context_size: int,
    model: Any = None,
    n_top: int = 8,
    n_groups: int = 3,
    per_group: int = 3,
    seed: int = 0,
    keep: np.ndarray | None = None,
) -> FeatureStats:
    """Statistics of every feature over `rows` (`(windows * context_size, d)`), reading
    only the rows in `keep` (default: all)."""
    kept = np.arange(len(rows)) if keep is None else np.flatnonzero(keep)
    r, f, v = firing_triplets(sae, rows[kept])
    r = kept[r]
    order = np.lexsort((-v, f))
    r, f, v = r[order], f[order], v[order]
    bounds = np.searchsorted(f, np.arange(sae.d_sae + 1))
    rng = np.random.default_rng(seed)
    density = np.diff(bounds) / max(1, len(kept))
    top, groups, hists = [], [], []
    for feature in range(sae.d_sae):
        a, b = bounds[feature], bounds[feature + 1]
        fr, fv = r[a:b], v[a:b]

        def item(i: int, fr: np.ndarray = fr, fv: np.ndarray = fv) -> tuple[int, int, float]:
            return int(fr[i] // context_size), int(fr[i] % context_size), float(fv[i])

        top.append([item(i) for i in range(min(n_top, len(fv)))])
        feature_groups = []
        if len(fv) > n_top:
            edges = np.quantile(fv, np.linspace(0, 1, n_groups + 1))
            for g in range(n_groups - 1, -1, -1):
                inside = np.flatnonzero((fv >= edges[g]) & (fv <= edges[g + 1]))
                pick = rng.choice(inside, min(per_group, len(inside)), replace=False)
                label = f"{edges[g]:.2f} – {edges[g + 1]:.2f}"
                feature_groups.append((label, [item(i) for i in sorted(pick)]))
        groups.append(feature_groups)
        if len(fv):
            counts, edges = np.histogram(fv, bins=20)
            hists.append({"counts": counts.tolist(), "lo": float(edges[0]), "hi": float(edges[-1])})
        else:
            hists.append({"counts": [], "lo": 0.0, "hi": 0.0})
    up, down = logit_effects(sae, model) if model is not None else ([[]] * sae.d_sae,) * 2
    return FeatureStats(density, top, groups, hists, up, down, int(len(kept)))


def _payload(stats: FeatureStats, windows: np.ndarray, decode: Any) -> dict[str, Any]:
    used: dict[int, int] = {}

    def tok(token_id: int) -> int:
        return used.setdefault(int(token_id), len(used))

    def context(item: tuple[int, int, float]) -> list:
        w, pos, act = item
        lo, hi = max(0, pos - CONTEXT), min(windows.shape[1], pos + CONTEXT + 1)
        return [[tok(t) for t in windows[w, lo:hi]], pos - lo, round(act, 3)]

    features = []
    for i in range(len(stats.density)):
        features.append({
            "d": float(stats.density[i]),
            "top": [context(c) for c in stats.top[i]],
            "groups": [[label, [context(c) for c in items]] for label, items in stats.groups[i]],
            "hist": stats.histograms[i],
            "up": [[tok(t), round(x, 3)] for t, x in stats.logits_up[i]],
            "down": [[tok(t), round(x, 3)] for t, x in stats.logits_down[i]],
        })  # fmt: skip
    vocab = [None] * len(used)
    for token_id, slot in used.items():
        vocab[slot] = decode(token_id)
    return {"features": features, "vocab": vocab, "tokens": stats.tokens, "meta": stats.meta}


def render_dashboard(stats: FeatureStats, windows: np.ndarray, decode: Any, title: str) -> str:
    """The dashboard HTML: data embedded as JSON, drawn by inline script; no network."""
    body = (
        f'<div id="index"><h1>{esc(title)}</h1><div id="summary"></div><table><thead><tr>'
        '<th class="l">feature</th><th>density</th></tr></thead><tbody id="rows"></tbody>'
        '</table></div>\n<div id="main"><p>Pick a feature.</p></div>\n'
        + json_script(_payload(stats, windows, decode), "data")
    )
    return page(title, body, css=CSS, script=ESCAPE_JS + HISTOGRAM_JS + SCRIPT)


def write_dashboard(stats: FeatureStats, windows: np.ndarray, decode: Any, out: str | Path,
                    title: str = "SAE features") -> Path:  # fmt: skip
    """Write the dashboard to `out` (a `.html` file); returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_dashboard(stats, windows, decode, title), encoding="utf-8")
    return out


def dashboard_for_sae(
    sae_dir: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    corpus: str = "default",
    tokens: int = 65_536,
    dtype: str = "auto",
    progress: bool = True,
    device: str = "auto",
) -> Path:
    """Load the SAE in `sae_dir` and its model (`model`, default: the one in its cfg) on
    `device`, run `tokens` tokens of `corpus` through both and write the dashboard HTML to
    `out`."""
    from madlens.errors import MadlensError
    from madlens.models import load_model
    from madlens.sae.capture import sink_rows, stream_activations
    from madlens.sae.corpus import build_corpus
    from madlens.sae.io import load_sae

    sae = load_sae(sae_dir)
    meta = sae.cfg.metadata
    model = model or meta.get("model_name")
    hook = meta.get("hook_name")
    if not model or not hook:
        raise MadlensError(f"{sae_dir}: cfg.json names no model_name / hook_name; pass --model")
    context_size = int(meta.get("context_size") or 128)
    lm = load_model(model, dtype=dtype, device=device)
    sae = sae.to(lm.device)
    hook = lm.check_hooks([hook])[0]
    if lm.d_model != sae.d_in and not hook.endswith(("hook_z",)):
        raise MadlensError(f"the SAE reads {sae.d_in} features, {hook} of {lm.name} has "
                           f"{lm.d_model}")  # fmt: skip
    windows = build_corpus(corpus, lm.tokenizer, context_size, tokens, progress=progress)
    rows = np.concatenate(
        list(stream_activations(lm, windows, hook, skip_first=False, progress=progress))
    )
    # as in training: no window's first position, no attention sink
    keep = ~sink_rows(np.linalg.norm(rows, axis=1))
    keep[::context_size] = False
    stats = feature_stats(sae, rows, context_size, lm, keep=keep)
    stats.meta = {"model": lm.name, "hook": hook, "sae": str(sae_dir), "corpus": corpus}
    title = f"SAE features: {lm.name} {hook} ({sae.d_sae} latents)"
    return write_dashboard(stats, windows, lm.tokenizer.decode, out, title)


# The page is an index of features (by density) beside the selected feature's panel.
CSS = """
body{margin:0;padding:0;max-width:none;display:flex;height:100vh}
#index{width:300px;overflow-y:auto;border-right:1px solid #ccc;font-size:13px}
#index table{border-collapse:collapse;width:100%;margin:0}
#index td{padding:2px 6px;cursor:pointer;border:0;text-align:left}
#main td,#main th{border:0;text-align:left}#index tr:hover{background:#eef}
#index tr.sel{background:#dde}
#main{flex:1;overflow-y:auto;padding:12px 20px}
.ctx{font-family:monospace;font-size:13px;margin:2px 0;white-space:pre-wrap}
.tok{border-radius:2px}.peak{outline:1px solid #c00}
.act{color:#666;display:inline-block;width:60px}
.logits{display:flex;gap:40px}.logits td{font-family:monospace;font-size:13px;padding:0 6px}
.up{color:#060}.down{color:#a00}
h1{font-size:18px;margin:8px}h2{font-size:16px}h3{font-size:14px;margin:10px 0 4px}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById("data").textContent);
const F = DATA.features, V = DATA.vocab;
const show = t => esc(V[t]).replace(/\\n/g,"\\u21b5");
function ctx(c, max){
  const [ids, at, act] = c;
  const parts = ids.map((t,i) => {
    const peak = i === at, a = peak ? Math.min(1, act / max) : 0;
    const bg = peak ? `background:rgba(255,120,0,${0.25 + 0.75 * a})` : "";
    return `<span class="tok${peak ? " peak" : ""}" style="${bg}">${show(t)}</span>`;
  });
  return `<div class="ctx"><span class="act">${act.toFixed(2)}</span>${parts.join("")}</div>`;
}
function hist(h){
  return h.counts.length ? histogramSvg(h.counts, h.lo, h.hi, "hist") : "<p>never fired</p>";
}
function render(i){
  const f = F[i]; if(!f) return;
  document.querySelectorAll("#rows tr").forEach(r => r.classList.toggle("sel", +r.dataset.f === i));
  const max = f.top.length ? f.top[0][2] : 1;
  const groups = f.groups.map(([label, cs]) =>
    `<h3>activations ${label}</h3>` + cs.map(c => ctx(c, max)).join("")).join("");
  const tbl = (rows, cls) => "<table>" + rows.map(([t,x]) =>
    `<tr><td>${show(t)}</td><td class="${cls}">${x.toFixed(3)}</td></tr>`).join("") + "</table>";
  document.getElementById("main").innerHTML = `<h2 id="feature-${i}">Feature ${i}</h2>
  <p>density <b>${f.d.toExponential(2)}</b>
  (${Math.round(f.d * DATA.tokens)} of ${DATA.tokens} tokens)</p>
  <h3>activation histogram</h3>${hist(f.hist)}
  <div class="logits"><div><h3>top logit effects</h3>${tbl(f.up,"up")}</div>
  <div><h3>bottom logit effects</h3>${tbl(f.down,"down")}</div></div>
  <h3>top activations</h3><div class="top">${f.top.map(c => ctx(c, max)).join("") || "none"}</div>
  <div class="groups">${groups}</div>`;
}
const order = F.map((f,i) => i).sort((a,b) => F[b].d - F[a].d || a - b);
document.getElementById("rows").innerHTML = order.map(i =>
  `<tr data-f="${i}"><td><a href="#feature-${i}">${i}</a></td>` +
  `<td>${F[i].d.toExponential(2)}</td></tr>`
).join("");
const dead = F.filter(f => f.d === 0).length;
document.getElementById("summary").textContent =
  `${F.length} features over ${DATA.tokens} tokens; ${dead} never fired`;
function route(){ const m = location.hash.match(/feature-(\\d+)/); render(m ? +m[1] : order[0]); }
window.addEventListener("hashchange", route); route();
"""

"""`overoptimization`: reward-model over-optimisation under best-of-n sampling (Gao, Schulman
& Hilton 2022). Also owns the sample pool and the proxy rewards `reward-outliers` reads."""

import inspect
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens import cache
from madlens.data import format_chat
from madlens.errors import MadlensError
from madlens.lab.base import Experiment, LabResult, Section
from madlens.models import load_hf
from madlens.report import esc, figure, fmt, line_chart, plot

REFERENCE = (
    "Gao, Schulman & Hilton 2022, Scaling Laws for Reward Model Overoptimization (arXiv:2210.10760)"
)
FINDING = (
    "Best-of-n against a proxy reward model: the proxy score keeps rising with "
    "d = sqrt(KL_bon), while the gold score rises, peaks and falls, following "
    "R(d) = d(alpha - beta d); proxies trained on more data are over-optimised later "
    "(larger alpha / beta)."
)

# Open-ended requests whose answers vary in sentiment (the gold reward's property).
PROMPTS = [
    "Describe your morning in one sentence.",
    "Write a short review of a restaurant you visited.",
    "How do you feel about Mondays?",
    "Tell me about a movie you watched recently.",
    "Describe the weather today.",
    "What do you think of your neighbourhood?",
    "Write a sentence about a trip you took.",
    "Describe the last meal you ate.",
    "How was your day at work?",
    "What is your opinion of public transport?",
    "Tell me about your last holiday.",
    "Describe a book you read recently.",
    "What do you think about social media?",
    "Write a short note to a friend about your week.",
    "Describe your commute.",
    "How do you feel about winter?",
    "Write a one-line review of a phone you own.",
    "Tell me about a concert you went to.",
    "What do you think of online shopping?",
    "Describe a hotel you stayed in.",
    "How do you feel about your job?",
    "Write a sentence about your favourite café.",
    "Describe a game you played recently.",
    "What do you think of the city you live in?",
    "Tell me about a course you took.",
    "Describe your last visit to the dentist.",
    "How do you feel about cooking?",
    "Write a short review of a museum.",
    "Describe a walk you took.",
    "What do you think of your new laptop?",
    "Tell me about a party you went to.",
    "Describe a customer service call you made.",
]


@dataclass(frozen=True)
class Budget:
    """The sample pool (`prompts` x `samples` completions of `new_tokens` tokens at
    temperature 1), the proxy reward models (one per labelled-set size in `proxy_labels`,
    their labels the gold reward plus Gaussian noise of `label_noise` gold standard
    deviations), the best-of-n sizes, bootstrap resamples over prompts, and (for
    `reward-outliers`) the completions per prompt the detectors are fitted on."""

    prompts: int = 8
    samples: int = 256
    new_tokens: int = 24
    proxy_labels: tuple[int, ...] = (32, 128, 512)
    label_noise: float = 0.5
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    bootstrap: int = 1000
    trusted_per_prompt: int = 64

    def check(self) -> None:
        """One line for a budget the experiment cannot run."""
        if not 2 <= self.prompts <= len(PROMPTS):
            raise MadlensError(f"prompts must be in 2..{len(PROMPTS)}, got {self.prompts}")
        if self.samples < 2 or self.new_tokens < 1:
            raise MadlensError("samples must be >= 2 and new_tokens >= 1")
        if not self.ns or min(self.ns) < 1 or max(self.ns) > self.samples:
            raise MadlensError(f"best-of-n sizes must lie in 1..{self.samples} (the pool)")
        if not self.proxy_labels or min(self.proxy_labels) < 2:
            raise MadlensError("each proxy needs at least 2 labels")
        if not 1 <= self.trusted_per_prompt < self.samples:
            raise MadlensError("trusted_per_prompt must be in 1..samples-1")


QUICK = Budget()
FULL = Budget(prompts=32, new_tokens=32)


# --- best-of-n: the closed forms ------------------------------------------------------------


def kl_bon(n: int | np.ndarray) -> np.ndarray:
    """KL(best-of-n || policy) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022)."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1) / n


def bon_weights(pool: int, n: int) -> np.ndarray:
    """P(the sample of rank i is the best of n drawn without replacement from `pool`), ranks
    ascending: C(i - 1, n - 1) / C(pool, n) for i = 1..pool. The expected reward of best-of-n
    is these weights against the rewards sorted by the selecting score: the unbiased
    estimator over every size-n subset of the pool, without enumerating them."""
    if not 1 <= n <= pool:
        raise MadlensError(f"best-of-{n} needs a pool of at least {n}, got {pool}")
    gammaln = np.vectorize(math.lgamma, otypes=[np.float64])
    i = np.arange(n, pool + 1, dtype=np.float64)  # ranks below n are never the best of n
    log_choose = gammaln(i) - math.lgamma(n) - gammaln(i - n + 1)
    log_total = math.lgamma(pool + 1) - math.lgamma(n + 1) - math.lgamma(pool - n + 1)
    weights = np.zeros(pool)
    weights[n - 1 :] = np.exp(log_choose - log_total)
    return weights


def best_of_n(select: np.ndarray, rewards: np.ndarray, ns: tuple[int, ...]) -> np.ndarray:
    """Expected `rewards` of the sample that maximises `select` among n drawn from each
    prompt's pool: `select` and `rewards` are `(prompts, pool)`; returns `(prompts, len(ns))`.
    Ties in `select` go to the later index (a stable sort)."""
    order = np.argsort(select, axis=1, kind="stable")
    ranked = np.take_along_axis(rewards, order, axis=1)
    weights = np.stack([bon_weights(select.shape[1], n) for n in ns], axis=1)
    return ranked @ weights


def fit_rd(d: np.ndarray, reward: np.ndarray) -> tuple[float, float]:
    """Least-squares alpha, beta of R(d) = d (alpha - beta d), the paper's best-of-n form
    (R(0) = 0: `reward` is measured from the policy's own mean)."""
    design = np.stack([d, -(d**2)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, reward, rcond=None)
    return float(alpha), float(beta)


# --- the sample pool --------------------------------------------------------------------------


def sample_pool(
    hf_model: Any,
    tokenizer: Any,
    prompts: list[str],
    samples: int,
    new_tokens: int,
    layer: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """`samples` completions of each prompt at temperature 1, batched per prompt over one
    shared prefill (the prompt's KV cache repeated `samples` times), and the mean over each
    completion's tokens of block `layer`'s output (`blocks.{layer}.hook_resid_post`), read in
    the same decoding pass. The first token is never end-of-turn (no empty completions); a
    completion ends before its first end-of-turn token. Returns `tokens` `(P, S, T)`,
    `lengths` `(P, S)` and `acts` `(P, S, d_model)`."""
    device = next(hf_model.parameters()).device
    eos = {tokenizer.eos_token_id}
    config_eos = getattr(hf_model.generation_config, "eos_token_id", None)
    eos.update(config_eos if isinstance(config_eos, list) else [config_eos])
    eos_ids = torch.tensor(sorted(int(t) for t in eos if t is not None), device=device)
    params = inspect.signature(hf_model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    all_tokens, all_lengths, all_acts = [], [], []
    for p, prompt in enumerate(tqdm(prompts, desc="sample pool", unit="prompt",
                                    disable=not progress)):  # fmt: skip
        text = format_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        width = ids.shape[1]
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + p)
        with torch.inference_mode():
            out = hf_model(input_ids=ids, use_cache=True)
            kv = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            kv.batch_repeat_interleave(samples)
            logits = out.logits[:, -1].float().expand(samples, -1).clone()
            logits[:, eos_ids] = -math.inf
            alive = torch.ones(samples, dtype=torch.bool, device=device)
            lengths = torch.zeros(samples, dtype=torch.long, device=device)
            total = torch.zeros(samples, hf_model.config.hidden_size, device=device)
            tokens = []
            for step in range(new_tokens):
                probs = torch.softmax(logits, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
                tokens.append(token[:, 0])
                alive &= ~torch.isin(token[:, 0], eos_ids)
                position = torch.full((samples, 1), width + step, device=device)
                out = hf_model(input_ids=token, position_ids=position, use_cache=True,
                               output_hidden_states=True, **{cache_kw: kv})  # fmt: skip
                kv = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                # hidden_states[0] is the embeddings: block L's output is hidden_states[L + 1]
                hidden = out.hidden_states[layer + 1][:, -1].float()
                total += hidden * alive[:, None]
                lengths += alive.long()
                logits = out.logits[:, -1].float()
        all_tokens.append(torch.stack(tokens, 1).cpu())
        all_lengths.append(lengths.cpu())
        all_acts.append((total / lengths.clamp(min=1)[:, None]).cpu())
    return {
        "tokens": torch.stack(all_tokens).numpy(),
        "lengths": torch.stack(all_lengths).numpy(),
        "acts": torch.stack(all_acts).numpy().astype(np.float32),
    }


def gold_reward(texts: list[str]) -> np.ndarray:
    """The gold reward the policy never sees: VADER's compound sentiment (Hutto & Gilbert
    2014, a lexicon and rule-based scorer), in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


@dataclass
class Pool:
    """The sample pool with its gold reward and each proxy's reward, all `(prompts, samples)`
    (`acts` `(prompts, samples, d_model)`); `proxies` by labelled-set size."""

    prompts: list[str]
    texts: list[list[str]]
    acts: np.ndarray
    gold: np.ndarray
    proxies: dict[int, np.ndarray]
    proxy_gold_r: dict[int, float]
    hook: str
    model: str
    seconds: float
    cached: bool


def default_layer(n_layers: int) -> int:
    """A middle block below the last (the last hidden state HF returns is normalised)."""
    return max(0, (n_layers - 1) // 2)


def build_pool(model: str, budget: Budget, seed: int, progress: bool, device: str) -> Pool:
    """The cached sample pool of `model` and the gold and proxy rewards of every sample."""
    budget.check()
    start = time.perf_counter()
    hf_model, tokenizer, fingerprint = load_hf(model, device=device)
    hf_model.eval()
    layer = default_layer(int(hf_model.config.num_hidden_layers))
    prompts = PROMPTS[: budget.prompts]
    dtype = str(next(hf_model.parameters()).dtype).removeprefix("torch.")
    key = cache.key(kind="overoptimization-pool", fingerprint=fingerprint, dtype=dtype,
                    prompts=prompts, samples=budget.samples, new_tokens=budget.new_tokens,
                    layer=layer, seed=seed, sampler=1)  # fmt: skip
    path = cache.folder("lab") / f"pool-{key}.safetensors"
    cached = path.is_file()
    arrays = cache.load_or_compute(path, lambda: sample_pool(
        hf_model, tokenizer, prompts, budget.samples, budget.new_tokens, layer, seed, progress
    ))  # fmt: skip
    texts = [
        tokenizer.batch_decode(
            [row[:n] for row, n in zip(tokens, lengths)], skip_special_tokens=True
        )
        for tokens, lengths in zip(arrays["tokens"].tolist(), arrays["lengths"].tolist())
    ]
    gold = gold_reward([t for row in texts for t in row]).reshape(len(prompts), -1)
    acts = arrays["acts"]
    proxies, corr = train_proxies(acts, gold, budget, seed)
    return Pool(prompts, texts, acts, gold, proxies, corr, f"blocks.{layer}.hook_resid_post",
                model, time.perf_counter() - start, cached)  # fmt: skip


def train_proxies(
    acts: np.ndarray, gold: np.ndarray, budget: Budget, seed: int
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Each proxy reward model: ridge regression (regularisation by leave-one-out on its own
    labels) on standardised activations, fitted on `size` completions of the other half of
    the prompts (cross-fitted by prompt parity, so no prompt scores completions its proxy
    was trained on), their labels gold + N(0, (label_noise * std gold)^2). Returns the proxy
    reward of every sample and its Pearson correlation with gold over the pool."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_prompts, n_samples, width = acts.shape
    fold = np.arange(n_prompts) % 2
    rng = np.random.default_rng(seed)
    proxies: dict[int, np.ndarray] = {}
    corr: dict[int, float] = {}
    for size in budget.proxy_labels:
        reward = np.zeros_like(gold)
        for f in (0, 1):
            x_pool = acts[fold != f].reshape(-1, width)
            y_pool = gold[fold != f].reshape(-1)
            pick = rng.choice(len(y_pool), size=min(size, len(y_pool)), replace=False)
            noise = budget.label_noise * float(np.std(y_pool))
            labels = y_pool[pick] + rng.normal(0.0, noise, size=len(pick))
            head = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13)))
            head.fit(x_pool[pick], labels)
            held = fold == f
            reward[held] = head.predict(acts[held].reshape(-1, width)).reshape(-1, n_samples)
        proxies[size] = reward
        ok = np.std(reward) > 0 and np.std(gold) > 0
        corr[size] = float(np.corrcoef(reward.ravel(), gold.ravel())[0, 1]) if ok else 0.0
    return proxies, corr


# --- the experiment ---------------------------------------------------------------------------


def _curves(select: np.ndarray, gold: np.ndarray, ns: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per prompt: gold and proxy of best-of-n by `select`, measured from n = 1."""
    gold_bon = best_of_n(select, gold, ns)
    proxy_bon = best_of_n(select, select, ns)
    return gold_bon - gold.mean(1, keepdims=True), proxy_bon - select.mean(1, keepdims=True)


def _ci(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def analyse(pool: Pool, budget: Budget, seed: int) -> dict[str, Any]:
    """Best-of-n curves, R(d) fits and their bootstrap over prompts, per proxy."""
    ns = tuple(budget.ns)
    d = np.sqrt(kl_bon(np.array(ns)))
    rng = np.random.default_rng(seed + 1)
    resamples = rng.integers(0, len(pool.prompts), size=(budget.bootstrap, len(pool.prompts)))
    out: dict[str, Any] = {}
    for size, proxy in pool.proxies.items():
        gold_c, proxy_c = _curves(proxy, pool.gold, ns)
        gold_mean, proxy_mean = gold_c.mean(0), proxy_c.mean(0)
        boot_gold = np.stack([gold_c[r].mean(0) for r in resamples])
        boot_proxy = np.stack([proxy_c[r].mean(0) for r in resamples])
        fits = {}
        for name, mean, boot in (("gold", gold_mean, boot_gold), ("proxy", proxy_mean, boot_proxy)):
            alpha, beta = fit_rd(d, mean)
            boot_fit = np.array([fit_rd(d, b) for b in boot])
            fits[name] = {
                "alpha": alpha, "alpha_ci": _ci(boot_fit[:, 0]),
                "beta": beta, "beta_ci": _ci(boot_fit[:, 1]),
                "d_peak": alpha / (2 * beta) if beta > 0 else None,
                "rmse": float(np.sqrt(np.mean((d * (alpha - beta * d) - mean) ** 2))),
            }  # fmt: skip
        peak = int(np.argmax(gold_mean))
        drop = boot_gold.max(1) - boot_gold[:, -1]
        out[str(size)] = {
            "labels": size,
            "proxy_gold_r": pool.proxy_gold_r[size],
            "gold": gold_mean.tolist(),
            "gold_ci": [_ci(boot_gold[:, j]) for j in range(len(ns))],
            "proxy": proxy_mean.tolist(),
            "proxy_ci": [_ci(boot_proxy[:, j]) for j in range(len(ns))],
            "fit_gold": fits["gold"],
            "fit_proxy": fits["proxy"],
            "gold_peak_n": ns[peak],
            "gold_drop": float(gold_mean.max() - gold_mean[-1]),
            "gold_drop_ci": _ci(drop),
            # falls: the curve's last point sits below its peak in 97.5% of resamples
            "gold_falls": bool(peak < len(ns) - 1 and np.percentile(drop, 2.5) > 0),
        }
    return {"n": list(ns), "kl": kl_bon(np.array(ns)).tolist(), "d": d.tolist(), "proxies": out}


def _chart(d: list[float], proxies: dict[str, Any], key: str, ylabel: str, fit: bool) -> str:
    series: dict[str, list[tuple[float, float | None]]] = {}
    dashed = set()
    for size, row in proxies.items():
        series[f"{key}, proxy of {size} labels"] = list(zip(d, row[key]))
        if fit:
            f = row[f"fit_{key}"]
            name = f"fit, {size} labels"
            series[name] = [(x, x * (f["alpha"] - f["beta"] * x)) for x in d]
            dashed.add(name)
    values = [y for points in series.values() for _, y in points if y is not None]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = 0.08 * (hi - lo or 1.0)
    return line_chart(series, xlabel="d = sqrt(KL_bon)", ylabel=ylabel,
                      ylim=(lo - pad, hi + pad), dashed=dashed, gridlines=[0.0])  # fmt: skip


def _table(proxies: dict[str, Any]) -> str:
    head = ("<tr><th>labels</th><th>proxy-gold r</th><th>gold alpha [95% CI]</th>"
            "<th>gold beta [95% CI]</th><th>gold peak n</th><th>gold drop from peak [CI]"
            "</th><th>proxy alpha</th><th>proxy beta</th></tr>")  # fmt: skip
    rows = []
    for size, row in proxies.items():
        g, p = row["fit_gold"], row["fit_proxy"]
        rows.append(
            f"<tr><td>{esc(size)}</td><td>{fmt(row['proxy_gold_r'])}</td>"
            f"<td>{fmt(g['alpha'])} [{fmt(g['alpha_ci'][0])}, {fmt(g['alpha_ci'][1])}]</td>"
            f"<td>{fmt(g['beta'])} [{fmt(g['beta_ci'][0])}, {fmt(g['beta_ci'][1])}]</td>"
            f"<td>{row['gold_peak_n']}</td><td>{fmt(row['gold_drop'])} "
            f"[{fmt(row['gold_drop_ci'][0])}, {fmt(row['gold_drop_ci'][1])}]</td>"
            f"<td>{fmt(p['alpha'])}</td><td>{fmt(p['beta'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def verdict(proxies: dict[str, Any]) -> str:
    """Where the measurement agrees with the paper's headline, in a few sentences."""
    falls = [s for s, r in proxies.items() if r["gold_falls"]]
    dips = [s for s, r in proxies.items() if not r["gold_falls"] and r["gold_drop"] > 0]
    first = (
        f"Gold falls after its peak (the drop's 95% CI excludes 0) for the proxies of "
        f"{', '.join(falls)} labels, as in the paper"
        if falls
        else "Gold does not measurably fall for any proxy over this range of n (unlike the paper)"
    )
    if dips:
        first += "; gold dips after its peak without significance for " + ", ".join(
            f"{s} labels (peak at n = {proxies[s]['gold_peak_n']}, drop "
            f"{proxies[s]['gold_drop']:.3f}, CI [{proxies[s]['gold_drop_ci'][0]:.3f}, "
            f"{proxies[s]['gold_drop_ci'][1]:.3f}])"
            for s in dips
        )
    rises = all(r["proxy"][-1] > r["proxy"][0] for r in proxies.values())
    second = (
        "the proxy reward keeps rising with d, as in the paper"
        if rises
        else "the proxy reward does not rise with d for every proxy"
    )
    alphas = ", ".join(f"{r['fit_gold']['alpha']:.3f}" for r in proxies.values())
    return (
        f"{first}; {second}. Gold alpha by proxy labels ({', '.join(proxies)}): {alphas} "
        "(the paper: larger proxies reach higher gold)."
    )


def measure(
    model: str, budget: Budget, seed: int = 0, progress: bool = False, device: str = "auto"
) -> LabResult:
    """The experiment at any budget (`run` picks the quick or the full one)."""
    start = time.perf_counter()
    pool = build_pool(model, budget, seed, progress, device)
    figures = analyse(pool, budget, seed)
    figures |= {
        "model": model,
        "hook": pool.hook,
        "budget": asdict(budget),
        "gold_mean_policy": float(pool.gold.mean()),
        "gold_std_policy": float(pool.gold.std()),
        "pool_cached": pool.cached,
        "pool_s": pool.seconds,
    }
    proxies = figures["proxies"]
    d = figures["d"]
    best = max(proxies.values(), key=lambda r: r["labels"])
    boxes = "".join(
        figure(fmt(r["proxy_gold_r"], 2), f"proxy-gold r, {s} labels") for s, r in proxies.items()
    ) + figure(str(best["gold_peak_n"]), f"gold peaks at n ({best['labels']} labels)")
    sections = [
        Section(
            "Best-of-n: gold and proxy reward against d",
            f"{budget.prompts} prompts x {budget.samples} completions of {budget.new_tokens} "
            f"tokens at temperature 1 from {model}; gold = VADER compound sentiment of the "
            f"completion (the policy never sees it); each proxy is a ridge head on "
            f"{pool.hook} (mean over the completion) trained on that many labels with noise "
            f"{budget.label_noise} gold s.d., cross-fitted by prompt. Rewards are measured "
            "from the policy's own mean (n = 1), in gold units; best-of-n by the unbiased "
            "estimator over each prompt's pool.",
            boxes
            + plot(
                "gold (solid) and its R(d) fit (dashed)",
                _chart(d, proxies, "gold", "gold reward - policy mean", True),
            )
            + plot(
                "proxy reward of the same selections",
                _chart(d, proxies, "proxy", "proxy reward - policy mean", False),
            ),
        ),  # fmt: skip
        Section(
            "R(d) = d(alpha - beta d), with bootstrap over prompts",
            "alpha, beta by least squares on the mean curve; 95% intervals from "
            f"{budget.bootstrap} resamples of the prompts. 'gold drop' is the peak minus the "
            "value at the largest n.",
            _table(proxies),
        ),
    ]
    return LabResult("overoptimization", figures, sections, FINDING, verdict(proxies),
                     time.perf_counter() - start)  # fmt: skip


def run(model: str, quick: bool, seed: int, progress: bool, device: str) -> LabResult:
    """The registered entry point: the quick or the full budget."""
    return measure(model, QUICK if quick else FULL, seed, progress, device)


EXPERIMENT = Experiment(
    "overoptimization",
    "best-of-n against proxy reward models: gold rises then falls while the proxy rises",
    run,
    REFERENCE,
)

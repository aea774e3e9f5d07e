"""`madlens sae train|dashboard` and `madlens explain`: train sparse autoencoders, browse
their features, and list the features that fired on an input."""

from pathlib import Path
from typing import Annotated

import typer

from madlens.cli.options import Device, Dtype, Model, OutDir, Seed, output_dir, output_file
from madlens.cli.runs import record_run, sae_rows
from madlens.models.registry import DEFAULT_MODEL

app = typer.Typer(help="Sparse autoencoders: train, browse features.", no_args_is_help=True)
SAE_MODEL_HELP = "model name, HF id or local dir (default: the SAE's cfg model)"
CORPUS_HELP = (
    "'default' (offline Python docs), a .txt/.md/.jsonl file or folder, or a Hugging Face "
    "dataset name"
)


@app.command("train")
def train(
    hook: Annotated[str, typer.Option(help="hook name, or a layer number (its resid_post)")],
    out: OutDir,
    model: Model = DEFAULT_MODEL,
    corpus: Annotated[str, typer.Option(help=CORPUS_HELP)] = "default",
    tokens: Annotated[int, typer.Option(min=2, help="training tokens")] = 2_000_000,
    architecture: Annotated[str, typer.Option(help="topk or relu")] = "topk",
    k: Annotated[int, typer.Option(min=1, help="TopK: latents firing per token")] = 32,
    expansion: Annotated[int, typer.Option(min=1, help="latents per input dimension")] = 8,
    l1: Annotated[float, typer.Option(min=0.0, help="ReLU: L1 coefficient")] = 5.0,
    lr: Annotated[float | None, typer.Option(help="Adam rate (default: scaled to size)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="activations per step")] = 1024,
    context_size: Annotated[int, typer.Option(min=2, help="tokens per window")] = 128,
    dtype: Dtype = "auto",
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    """Train an SAE on one hook's activations; writes SAELens-format files (cfg.json,
    sae_weights.safetensors, sparsity.safetensors) and metrics.json."""
    from madlens.sae.train import TrainConfig, train_on_model

    output_dir(out)
    config = TrainConfig(architecture=architecture, k=k, expansion=expansion, l1_coefficient=l1,
                         lr=lr, batch_size=batch_size, seed=seed)  # fmt: skip
    metrics = train_on_model(model, hook, out, corpus=corpus, tokens=tokens,
                             context_size=context_size, config=config, dtype=dtype,
                             device=device)  # fmt: skip
    ev = metrics["eval"]
    typer.echo(
        f"{metrics['model']} {metrics['hook']}: {metrics['d_sae']} latents, "
        f"{metrics['training_tokens']} tokens; held-out explained variance "
        f"{ev['explained_variance']:.3f}, L0 {ev['l0']:.1f}, dead {metrics['dead_fraction']:.1%}, "
        f"ce_loss_score {ev['ce_loss_score']:.3f} (CE clean {ev['ce_clean']:.3f}, "
        f"SAE {ev['ce_sae']:.3f}, ablated {ev['ce_ablation']:.3f})"
    )
    typer.echo(f"wrote {out} in {metrics['total_seconds']:.0f} s")
    record_run(
        "sae train", sae_rows(metrics), wall_s=metrics["total_seconds"], model=model, dtype=dtype
    )


@app.command("dashboard")
def dashboard(
    sae: Annotated[Path, typer.Option(help="SAE dir (cfg.json + sae_weights.safetensors)")],
    out: Annotated[Path, typer.Option(help="output HTML file")],
    model: Annotated[str | None, typer.Option(help=SAE_MODEL_HELP)] = None,
    corpus: Annotated[str, typer.Option(help="text the features are shown on")] = "default",
    tokens: Annotated[int, typer.Option(min=2, help="tokens of corpus to scan")] = 65_536,
    dtype: Dtype = "auto",
    device: Device = "auto",
) -> None:
    """Write a self-contained feature dashboard (index by density, contexts, logit effects)."""
    from madlens.sae.dashboard import dashboard_for_sae

    output_file(out)
    path = dashboard_for_sae(sae, out, model=model, corpus=corpus, tokens=tokens, dtype=dtype,
                             device=device)  # fmt: skip
    typer.echo(f"wrote {path}")


def explain(
    sae: Annotated[Path, typer.Option(help="SAE dir (with sparsity.safetensors)")],
    text: Annotated[str, typer.Option(help="the input to explain")],
    model: Annotated[str | None, typer.Option(help=SAE_MODEL_HELP)] = None,
    dashboard: Annotated[str | None, typer.Option(help="dashboard HTML to link into")] = None,
    top: Annotated[int, typer.Option(min=1, help="features to list")] = 10,
    dtype: Dtype = "auto",
    device: Device = "auto",
) -> None:
    """List the SAE features that fired on an input, rarest first, with dashboard links."""
    from madlens.sae.explain import explain_sae

    hook, hits = explain_sae(sae, text, model=model, top=top, dtype=dtype, device=device)
    typer.echo(f"{len(hits)} rarest features on {hook} (density on the SAE's training data):")
    for hit in hits:
        link = f"  {dashboard}#feature-{hit.feature}" if dashboard else ""
        where = f"at {hit.token!r} (token {hit.position})"
        typer.echo(
            f"  feature {hit.feature:>6}  density {hit.density:.2e}  "
            f"act {hit.activation:6.2f} {where}{link}"
        )

"""`madlens extract`: activations of a JSONL dataset at hook points, written as one
safetensors file per position and hook plus a manifest.json."""

import json
from pathlib import Path
from typing import Annotated

import typer

from madlens.cli.options import (
    Device,
    Dtype,
    Engine,
    Hooks,
    Model,
    OutDir,
    RayAddress,
    names,
    output_dir,
)
from madlens.models.registry import DEFAULT_MODEL


def extract(
    data: Annotated[Path, typer.Option(help="JSONL file: one {'text'} or {'messages'} per line")],
    out: OutDir,
    model: Model = DEFAULT_MODEL,
    hooks: Hooks = "-1",
    positions: Annotated[str, typer.Option(help="comma-separated: last, all, response, mean")] = (
        "last"
    ),
    dtype: Dtype = "auto",
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    padding_side: Annotated[str, typer.Option(help="right or left")] = "right",
    logits: Annotated[bool, typer.Option(help="also save final-token logits")] = False,
    logprobs: Annotated[bool, typer.Option(help="also save per-token log-probs")] = False,
    max_length: Annotated[int | None, typer.Option(min=1, help="context limit in tokens")] = None,
    strict: Annotated[bool, typer.Option(help="fail on inputs longer than the context")] = False,
    cache: Annotated[bool, typer.Option(help="use the on-disk activation cache")] = True,
    engine: Engine = "local",
    ray_address: RayAddress = None,
) -> None:
    """Capture activations of a JSONL dataset at hook points; writes one safetensors file
    per position and hook (`acts`, `lengths`) and a manifest.json."""
    from safetensors.numpy import save_file

    from madlens.activations import extract as run_extract
    from madlens.activations.positions import check_inputs, check_position, hook_shapes
    from madlens.activations.store import LOGPROBS, chunk_to_tensors
    from madlens.data import read_inputs
    from madlens.errors import MadlensError
    from madlens.models import load_model, parse_hooks
    from madlens.scale.cluster import check_engine

    output_dir(out)
    position_list = [check_position(p) for p in names(positions, "positions")]
    if padding_side not in ("left", "right"):
        raise MadlensError(f"--padding-side must be 'left' or 'right', not '{padding_side}'")
    check_engine(engine, ray_address)
    if engine == "ray" and not cache:
        raise MadlensError("--engine ray fills the activation cache: drop --no-cache")
    inputs = read_inputs(data)
    for position in position_list:
        check_inputs(inputs, position)
    lm = load_model(model, dtype=dtype, device=device)
    hook_list = lm.check_hooks(parse_hooks(hooks, lm.n_layers))
    for position in position_list:
        hook_shapes(lm, hook_list, position)
    manifest = {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."),
                "device": str(lm.device), "n_inputs": len(inputs), "files": []}  # fmt: skip
    if engine == "ray":  # fill the cache through Ray workers; the reads below then hit it
        from madlens.scale import Request, fill_cache

        requests = [
            Request(inputs, hook_list, p, logits=logits, logprobs=logprobs,
                    max_length=max_length, strict=strict)
            for p in position_list
        ]  # fmt: skip
        fill_cache(lm, requests, batch_size=batch_size, padding_side=padding_side,
                   address=ray_address)  # fmt: skip
    for position in position_list:
        acts = run_extract(
            lm, inputs, hook_list, position, batch_size=batch_size, padding_side=padding_side,
            logits=logits, logprobs=logprobs, max_length=max_length, strict=strict, cache=cache,
        )  # fmt: skip
        folder = out / position
        folder.mkdir(parents=True, exist_ok=True)
        for hook in hook_list:
            save_file(
                {"acts": acts[hook], "lengths": acts.lengths}, str(folder / f"{hook}.safetensors")
            )
            manifest["files"].append(
                {
                    "position": position,
                    "hook": hook,
                    "path": f"{position}/{hook}.safetensors",
                    "shape": list(acts[hook].shape),
                }  # fmt: skip
            )
        if logits or logprobs:
            outputs = {}
            if logits:
                outputs["logits"] = acts.logits
            if logprobs:
                packed = chunk_to_tensors(acts, LOGPROBS)
                outputs["token_logprobs"] = packed["values"]
                outputs["token_logprobs_lengths"] = packed["lengths"]
            save_file(outputs, str(folder / "outputs.safetensors"))
        typer.echo(
            f"{position}: {len(hook_list)} hook(s), {int(acts.lengths.sum())} rows -> {folder}"
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))

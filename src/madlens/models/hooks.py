"""Hook names: TransformerLens's scheme (`blocks.{L}.hook_resid_post`, `hook_embed`, ...).

Helpers to spell the common ones and to check requested names against a model's.
"""

import difflib

from madlens.errors import MadlensError


def resid_post(layer: int) -> str:
    """The residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def resid_pre(layer: int) -> str:
    """The residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


def mlp_out(layer: int) -> str:
    """The MLP's output of block `layer`, before it is added to the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_z(layer: int) -> str:
    """The attention heads' weighted values of block `layer` (`batch, pos, head, d_head`)."""
    return f"blocks.{layer}.attn.hook_z"


def residual_hooks(n_layers: int) -> list[str]:
    """Every block's `hook_resid_post`, in depth order."""
    return [resid_post(layer) for layer in range(n_layers)]


def check_hooks(requested: list[str], available: list[str]) -> list[str]:
    """Return `requested` unchanged if every name exists, else fail naming the nearest ones."""
    if not requested:
        raise MadlensError("no hook names given")
    known = set(available)
    for name in requested:
        if name not in known:
            near = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise MadlensError(f"unknown hook '{name}'{hint}")
    return list(dict.fromkeys(requested))


def parse_hooks(spec: str, n_layers: int) -> list[str]:
    """Parse a comma-separated hook list; bare integers mean `blocks.{L}.hook_resid_post`
    (negative counts from the end) and `all-resid` means every block's residual stream."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "all-resid":
            names.extend(residual_hooks(n_layers))
        elif item.lstrip("-").isdigit():
            layer = int(item)
            if not -n_layers <= layer < n_layers:
                raise MadlensError(f"layer {layer} out of range: the model has {n_layers} blocks")
            names.append(resid_post(layer % n_layers))
        else:
            names.append(item)
    return names

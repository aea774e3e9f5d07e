"""Activation and path patching on TransformerLens hook names, batched: each patched run is a
copy in one big batch that starts at the first block it changes and reads only answer logits.

Everything runs on the model's device (`model.device`): the session keeps its prompts and
caches there, takes index tensors from anywhere, and the public experiments return their
`(n_layers, ...)` results on the host."""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from madlens.errors import MadlensError

Head = tuple[int, int]
Hook = tuple[str, Callable]
RUNS = ("clean", "corrupted")
RECEIVER_INPUTS = ("q", "k", "v", "logits")
FINAL = "ln_final.hook_in"


def resid_pre(layer: int) -> str:
    """The residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


def head_z(layer: int) -> str:
    """Each head's attention-weighted values in block `layer` (`batch, pos, head, d_head`)."""
    return f"blocks.{layer}.attn.hook_z"


def attn_hook(layer: int, name: str) -> str:
    """A hook inside block `layer`'s attention (`hook_q`, `hook_pattern`, ...)."""
    return f"blocks.{layer}.attn.{name}"


def _expand(value: Any, n: int) -> Any:
    """Broadcast a recorded batch-of-one block input to `n` rows (a view, not a copy)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, n) for v in value)
    return value


def _view(act: torch.Tensor, copies: int) -> torch.Tensor:
    """`(copies * n, ...)` as `(copies, n, ...)`."""
    return act.view(copies, act.shape[0] // copies, *act.shape[1:])


def _check_run(run: str) -> str:
    if run not in RUNS:
        raise MadlensError(f"run must be 'clean' or 'corrupted', not '{run}'")
    return run


@dataclass
class Group:
    """Prompts of one length. Patched runs go group by group, so no block computes padding."""

    rows: torch.Tensor  # indices of the prompts in this group
    width: int  # their common length in tokens
    end: torch.Tensor  # each one's answer position
    inputs: list  # what each block is passed besides the residual, at this width


class PatchingSession:
    """A model's clean and corrupted runs on aligned prompt pairs, their activation caches, and
    a forward that starts at any block, so a patch at layer L never recomputes layers < L.

    The metric is the logit difference `logit(answers[:, 0]) - logit(answers[:, 1])` at each
    prompt's position `end`, averaged over prompts; `normalise` maps it so that the clean run
    scores 1 and the corrupted run 0. Prompts are right-padded; the real positions never see
    the padding (causal attention), and patched runs skip it by grouping prompts by length.
    Tokens, answers, positions and caches live on the model's device (`device`).
    """

    def __init__(
        self,
        model: Any,
        clean_tokens: torch.Tensor,
        corrupted_tokens: torch.Tensor,
        answers: torch.Tensor,
        end: torch.Tensor,
        *,
        batch_size: int = 512,
        progress: bool = True,
    ) -> None:
        if clean_tokens.shape != corrupted_tokens.shape:
            raise MadlensError(
                f"clean and corrupted tokens must line up: {tuple(clean_tokens.shape)} vs "
                f"{tuple(corrupted_tokens.shape)}"
            )
        n = clean_tokens.shape[0]
        if answers.shape != (n, 2) or end.shape != (n,):
            raise MadlensError("answers must be (n, 2) token ids and end (n,) positions")
        if int(end.max()) >= clean_tokens.shape[1] or int(end.min()) < 0:
            raise MadlensError("an answer position lies outside the prompt")
        self.model = model
        self.bridge = model.bridge
        self.device = device = model.device
        self.tokens = {"clean": clean_tokens.long().to(device),
                       "corrupted": corrupted_tokens.long().to(device)}  # fmt: skip
        self.answers = answers.long().to(device)
        self.end = end.long().to(device)
        self.n = n
        self.batch_size = batch_size
        self.progress = progress
        cfg = self.bridge.cfg
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        self.d_head = int(cfg.d_head)
        names = set(model.hook_names)
        self._q_name = "hook_rot_q" if attn_hook(0, "hook_rot_q") in names else "hook_q"
        self._k_name = "hook_rot_k" if attn_hook(0, "hook_rot_k") in names else "hook_k"
        self.groups = self._make_groups()
        self.caches = {run: self._cache(self.tokens[run]) for run in RUNS}
        rows = torch.arange(n, device=device)
        self.logit_diffs = {
            run: self._logit_diff(self.caches[run][FINAL][rows, self.end], self.answers)
            for run in RUNS
        }

    # -- set-up ------------------------------------------------------------------------------

    def _make_groups(self) -> list[Group]:
        groups = []
        for width in sorted({e + 1 for e in self.end.tolist()}):
            rows = torch.nonzero(self.end + 1 == width).flatten()
            inputs = self._record_block_inputs(self.tokens["clean"][rows[:1], :width])
            groups.append(Group(rows, width, self.end[rows], inputs))
        return groups

    def _record_block_inputs(self, tokens: torch.Tensor) -> list[tuple[tuple, dict]]:
        """What the model passes each block besides the residual (rotary tables, causal mask,
        position ids): recorded once on a batch of one and replayed for patched runs."""
        recorded: dict[int, tuple[tuple, dict]] = {}

        def recorder(layer: int) -> Callable:
            def hook(module: Any, args: tuple, kwargs: dict) -> None:
                kept = {k: v for k, v in kwargs.items() if "past_key" not in k}
                recorded[layer] = (tuple(args[1:]), kept)

            return hook

        handles = [
            block.register_forward_pre_hook(recorder(i), with_kwargs=True)
            for i, block in enumerate(self.bridge.blocks)
        ]
        try:
            with torch.inference_mode():
                self.bridge(tokens, return_type=None, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return [recorded[i] for i in range(self.n_layers)]

    def _cache(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {FINAL}
        for layer in range(self.n_layers):
            wanted |= {resid_pre(layer), head_z(layer), attn_hook(layer, "hook_pattern")}
            wanted |= {f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"}
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
        step = max(1, self.batch_size)
        with torch.inference_mode():
            for start in range(0, len(tokens), step):
                _, cache = self.bridge.run_with_cache(
                    tokens[start : start + step],
                    names_filter=lambda name: name in wanted,
                    use_cache=False,
                )
                for name in wanted:
                    parts[name].append(cache[name].detach())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    # -- running -----------------------------------------------------------------------------

    def take(self, run: str, name: str, group: Group, copies: int = 1) -> torch.Tensor:
        """A cached activation restricted to `group`'s prompts and width, stacked `copies`
        times (copy-major rows)."""
        cached = self.caches[_check_run(run)][name][group.rows]
        if name.endswith("hook_pattern"):
            cached = cached[..., : group.width, : group.width]
        elif cached.ndim > 2:
            cached = cached[:, : group.width]
        return cached.repeat(copies, *[1] * (cached.ndim - 1)) if copies > 1 else cached

    def forward(
        self,
        layer: int,
        resid: torch.Tensor,
        group: Group,
        hooks: Sequence[Hook] = (),
        stop: int | None = None,
    ) -> torch.Tensor:
        """Run blocks `layer .. stop - 1` (default: to the end) on the residual stream `resid`
        `(rows, group.width, d_model)` with TransformerLens forward hooks; return the residual
        after them."""
        stop = self.n_layers if stop is None else stop
        x = resid
        with torch.inference_mode(), self.bridge.hooks(fwd_hooks=list(hooks)):
            for index in range(layer, stop):
                args, kwargs = group.inputs[index]
                rows = x.shape[0]
                out = self.bridge.blocks[index](
                    x, *_expand(args, rows), **{k: _expand(v, rows) for k, v in kwargs.items()}
                )
                x = out[0] if isinstance(out, tuple) else out
        return x

    def _logit_diff(self, final: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Logit differences from final residuals at the answer positions, `(rows, d_model)`."""
        with torch.inference_mode():
            normed = self.bridge.ln_final(final)
            unembed = getattr(self.bridge.unembed, "original_component", None)
            if isinstance(unembed, torch.nn.Linear):
                weights = unembed.weight[answers].float()  # (rows, 2, d_model)
                logits = torch.einsum("rd,rad->ra", normed.float(), weights)
                if unembed.bias is not None:
                    logits = logits + unembed.bias[answers].float()
            else:
                logits = self.bridge.unembed(normed[:, None])[:, 0].float().gather(1, answers)
        return logits[:, 0] - logits[:, 1]

    def logit_diff_from(
        self, layer: int, resid: torch.Tensor, group: Group, hooks: Sequence[Hook] = ()
    ) -> torch.Tensor:
        """`(copies, len(group.rows))` logit differences of a run started at block `layer`
        from `resid`, whose rows are copies of the group's prompts (copy-major)."""
        final = self.forward(layer, resid, group, hooks)
        copies = final.shape[0] // len(group.rows)
        rows = torch.arange(final.shape[0], device=final.device)
        at_end = final[rows, group.end.repeat(copies)]
        return self._logit_diff(at_end, self.answers[group.rows].repeat(copies, 1)).view(copies, -1)

    def normalise(self, logit_diff: torch.Tensor) -> torch.Tensor:
        """Mean over the last axis (prompts), mapped so clean = 1 and corrupted = 0."""
        clean = self.logit_diffs["clean"].mean()
        corrupted = self.logit_diffs["corrupted"].mean()
        gap = clean - corrupted
        if abs(float(gap)) < 1e-6:
            gap = gap.new_tensor(1e-6)
        return (logit_diff.float().mean(-1) - corrupted) / gap

    def sweep(
        self,
        layer: int,
        n_copies: int,
        make_hooks: Callable[[range, Group], list[Hook]],
        base: str,
        bar: Any = None,
    ) -> torch.Tensor:
        """Run `n_copies` patched copies of the `base` run from block `layer`, group by group
        in chunks of at most `batch_size` rows; `make_hooks(chunk, group)` builds the hooks for
        copies `chunk` of `group`'s prompts. Returns `(n_copies, n)` logit differences."""
        out = torch.zeros(n_copies, self.n, device=self.device)
        for group in self.groups:
            per_chunk = max(1, self.batch_size // len(group.rows))
            for start in range(0, n_copies, per_chunk):
                chunk = range(start, min(n_copies, start + per_chunk))
                resid = self.take(base, resid_pre(layer), group, len(chunk))
                lds = self.logit_diff_from(layer, resid, group, make_hooks(chunk, group))
                out[start : chunk.stop, group.rows] = lds
                if bar is not None:
                    bar.update(len(chunk) * len(group.rows) / self.n)
        return out

    def bar(self, total: int, desc: str) -> Any:
        """A progress bar over patched runs (silent when made with `progress=False`)."""
        return tqdm(
            total=total, desc=desc, unit="run", disable=not self.progress, leave=False,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]",
        )  # fmt: skip

    def group_of(self, head: int) -> int:
        """The key/value head that query head `head` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def scaling(self, layer: int) -> float:
        """The factor attention scores are multiplied by in block `layer`."""
        original = getattr(self.bridge.blocks[layer].attn, "original_component", None)
        return float(getattr(original, "scaling", self.d_head**-0.5))


def _position_columns(
    session: PatchingSession, positions: dict[str, torch.Tensor] | None
) -> tuple[list[str], torch.Tensor]:
    """Named positions (`{"IO": (n,) indices, ...}`) or, by default, every raw position, as
    `(columns, n)` indices on the session's device."""
    if positions is None:
        width = session.tokens["clean"].shape[1]
        every = torch.arange(width, device=session.device)[:, None].expand(width, session.n)
        return [str(p) for p in range(width)], every
    stacked = torch.stack([positions[name].long() for name in positions])
    return list(positions), stacked.to(session.device)


def patch_layer_pos(
    session: PatchingSession,
    hook: str = "resid_pre",
    positions: dict[str, torch.Tensor] | None = None,
    *,
    base: str = "clean",
    source: str = "corrupted",
    normalise: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """Patch one block-level activation (`resid_pre`, `attn_out` or `mlp_out`) at one layer and
    one position at a time from the `source` run into the `base` run.

    Returns `(n_layers, n_positions)` metrics and the position labels. With `positions` (a dict
    of per-prompt indices, e.g. IOI's IO / S1 / S2 / END) each column is a named position;
    otherwise column p is raw token position p (a no-op for prompts shorter than p + 1).
    """
    if hook not in ("resid_pre", "attn_out", "mlp_out"):
        raise MadlensError(f"hook must be resid_pre, attn_out or mlp_out, not '{hook}'")
    _check_run(base), _check_run(source)
    labels, columns = _position_columns(session, positions)
    result = torch.zeros(session.n_layers, len(labels), device=session.device)
    bar = session.bar(session.n_layers * len(labels), f"patch {hook} by layer and position")
    for layer in range(session.n_layers):
        name = f"blocks.{layer}.hook_{hook}"

        def make_hooks(chunk: range, group: Group, name: str = name) -> list[Hook]:
            src = session.take(source, name, group)
            local = torch.arange(len(group.rows), device=session.device)

            def patch(act: torch.Tensor, hook: Any) -> torch.Tensor:
                act = _view(act.clone(), len(chunk))
                for i, column in enumerate(chunk):
                    where = columns[column][group.rows]
                    inside = where < group.width
                    act[i, local[inside], where[inside]] = src[local[inside], where[inside]]
                return act.flatten(0, 1)

            return [(name, patch)]

        lds = session.sweep(layer, len(labels), make_hooks, base, bar)
        result[layer] = session.normalise(lds) if normalise else lds.mean(-1)
    bar.close()
    return result.cpu(), labels


def patch_head_out(
    session: PatchingSession,
    *,
    position: torch.Tensor | None = None,
    base: str = "clean",
    source: str = "corrupted",
    normalise: bool = True,
) -> torch.Tensor:
    """Patch each attention head's output (`hook_z`) from `source` into `base`, one head at a
    time, at every position (or only at per-prompt `position`). Returns `(n_layers, n_heads)`.

    All heads of a layer run as one batch that starts at that layer, reusing both caches.
    """
    _check_run(base), _check_run(source)
    result = torch.zeros(session.n_layers, session.n_heads, device=session.device)
    position = None if position is None else position.long().to(session.device)
    bar = session.bar(session.n_layers * session.n_heads, "patch head outputs")
    for layer in range(session.n_layers):

        def make_hooks(chunk: range, group: Group, layer: int = layer) -> list[Hook]:
            src = session.take(source, head_z(layer), group)
            local = torch.arange(len(group.rows), device=session.device)
            where = None if position is None else position[group.rows]

            def patch(z: torch.Tensor, hook: Any) -> torch.Tensor:
                z = _view(z.clone(), len(chunk))
                for i, head in enumerate(chunk):
                    if where is None:
                        z[i, :, :, head] = src[:, :, head]
                    else:
                        z[i, local, where, head] = src[local, where, head]
                return z.flatten(0, 1)

            return [(head_z(layer), patch)]

        lds = session.sweep(layer, session.n_heads, make_hooks, base, bar)
        result[layer] = session.normalise(lds) if normalise else lds.mean(-1)
    bar.close()
    return result.cpu()


def head_outputs(session: PatchingSession, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write into the residual stream, `(head, ..., d_model)`, from `z`
    `(..., head, d_head)`: the block's own output projection applied to one head's slice at a
    time, minus its bias (shared by all heads, it belongs to none)."""
    project = session.bridge.blocks[layer].attn.o
    eye = torch.eye(session.n_heads, dtype=z.dtype, device=z.device)
    masked = z[None] * eye.view(session.n_heads, *[1] * (z.ndim - 2), session.n_heads, 1)
    flat = masked.flatten(-2)
    with torch.inference_mode():
        return project(flat) - project(torch.zeros_like(flat[:1]))


def path_patch(
    session: PatchingSession,
    receivers: Iterable[Head] | str,
    receiver_input: str = "q",
    *,
    senders: Iterable[Head] | None = None,
    base: str = "clean",
    source: str = "corrupted",
    through_mlps: bool = True,
    normalise: bool = True,
) -> torch.Tensor:
    """Path patching (Wang et al. 2022): the effect of each sender head's `source` output on the
    metric only through the `receiver_input` (q, k or v) of `receivers`, or only directly
    (`receivers="logits"`: the sender's write reaches the unembedding unchanged).

    For q/k/v, each sender runs in two passes: (1) the `base` run with the sender patched from
    `source` and every other head frozen at its `base` output (MLPs recomputed unless
    `through_mlps=False`, which leaves only the direct residual edge), caching the receivers'
    inputs; (2) the `base` run with only those receiver inputs patched. Keys and values are
    patched per query head even under grouped-query attention (through the scores and the
    weighted values). Returns `(n_layers, n_heads)`; NaN where a sender reaches no receiver.
    """
    _check_run(base), _check_run(source)
    if receiver_input not in RECEIVER_INPUTS:
        raise MadlensError(f"receiver_input must be one of {', '.join(RECEIVER_INPUTS)}")
    to_logits = isinstance(receivers, str)
    if to_logits != (receiver_input == "logits") or (to_logits and receivers != "logits"):
        raise MadlensError("pass receivers='logits' with receiver_input='logits', else heads")
    if to_logits:
        return _path_to_logits(session, senders, base, source, normalise).cpu()
    receivers = sorted(set(receivers))
    if not receivers:
        raise MadlensError("path patching needs at least one receiver head")
    top = max(layer for layer, _ in receivers)
    if senders is None:
        senders = [(layer, h) for layer in range(top) for h in range(session.n_heads)]
    senders = sorted({(layer, h) for layer, h in senders if layer < top})
    result = torch.full((session.n_layers, session.n_heads), float("nan"), device=session.device)
    bar = session.bar(len(senders), f"path patch -> {receiver_input}")
    for layer in sorted({layer for layer, _ in senders}):
        heads = [h for sl, h in senders if sl == layer]
        later = [(rl, rh) for rl, rh in receivers if rl > layer]
        first = min(rl for rl, _ in later)
        lds = torch.zeros(len(heads), session.n, device=session.device)
        for group in session.groups:
            per_chunk = max(1, session.batch_size // len(group.rows))
            for start in range(0, len(heads), per_chunk):
                chunk = heads[start : start + per_chunk]
                captured = _capture_receiver_inputs(
                    session, group, layer, chunk, later, receiver_input, base, source,
                    through_mlps,
                )  # fmt: skip
                hooks = _receiver_hooks(session, later, receiver_input, captured)
                resid = session.take(base, resid_pre(first), group, len(chunk))
                lds[start : start + len(chunk), group.rows] = session.logit_diff_from(
                    first, resid, group, hooks
                )
                bar.update(len(chunk) * len(group.rows) / session.n)
        result[layer, heads] = session.normalise(lds) if normalise else lds.mean(-1)
    bar.close()
    return result.cpu()


def _capture_receiver_inputs(
    session: PatchingSession,
    group: Group,
    layer: int,
    senders: list[int],
    receivers: list[Head],
    receiver_input: str,
    base: str,
    source: str,
    through_mlps: bool,
) -> dict[int, torch.Tensor]:
    """Pass 1: base run, sender heads (one per copy) from `source`, other heads frozen; returns
    the receiver layers' q (all query heads) or k / v (all key-value heads), copy-major."""
    copies = len(senders)
    top = max(rl for rl, _ in receivers)
    src = session.take(source, head_z(layer), group)

    def set_senders(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = _view(z.clone(), copies)
        for i, head in enumerate(senders):
            z[i, :, :, head] = src[:, :, head]
        return z.flatten(0, 1)

    hooks: list[Hook] = [(head_z(layer), set_senders)]
    for later in range(layer + 1, top + 1):
        frozen = session.take(base, head_z(later), group, copies)
        hooks.append((head_z(later), lambda z, hook, frozen=frozen: frozen))
    if not through_mlps:
        for later in range(layer, top):
            name = f"blocks.{later}.hook_mlp_out"
            frozen = session.take(base, name, group, copies)
            hooks.append((name, lambda a, hook, frozen=frozen: frozen))
    captured: dict[int, torch.Tensor] = {}
    name = {"q": "hook_q", "k": session._k_name, "v": "hook_v"}[receiver_input]
    for rl in sorted({rl for rl, _ in receivers}):

        def capture(act: torch.Tensor, hook: Any, rl: int = rl) -> None:
            captured[rl] = act.detach().clone()

        hooks.append((attn_hook(rl, name), capture))
    resid = session.take(base, resid_pre(layer), group, copies)
    session.forward(layer, resid, group, hooks, stop=top + 1)
    return captured


def _receiver_hooks(
    session: PatchingSession,
    receivers: list[Head],
    receiver_input: str,
    captured: dict[int, torch.Tensor],
) -> list[Hook]:
    """Pass 2: hooks that give each receiver head its input from pass 1 and nothing else."""
    hooks: list[Hook] = []
    by_layer: dict[int, list[int]] = {}
    for rl, rh in receivers:
        by_layer.setdefault(rl, []).append(rh)
    for rl, heads in by_layer.items():
        patched = captured[rl]
        if receiver_input == "q":

            def set_q(q: torch.Tensor, hook: Any, heads: list = heads, new: Any = patched) -> Any:
                q = q.clone()
                q[:, :, heads] = new[:, :, heads]
                return q

            hooks.append((attn_hook(rl, "hook_q"), set_q))
        elif receiver_input == "k":
            hooks.extend(_key_hooks(session, rl, heads, patched))
        else:
            hooks.extend(_value_hooks(session, rl, heads, patched))
    return hooks


def _keep(seen: dict, key: str) -> Callable:
    def hook(act: torch.Tensor, hook: Any) -> None:
        seen[key] = act

    return hook


def _key_hooks(
    session: PatchingSession, layer: int, heads: list[int], new_k: torch.Tensor
) -> list[Hook]:
    """Patch receiver heads' keys alone: add `scale * q_h . (k_new - k)` to their scores, which
    leaves the other query heads that share the key head (GQA) untouched."""
    seen: dict[str, torch.Tensor] = {}
    scale = session.scaling(layer)

    def scores(s: torch.Tensor, hook: Any) -> torch.Tensor:
        s = s.clone()
        width = s.shape[-1]
        causal = torch.ones(width, width, dtype=torch.bool, device=s.device).tril()
        for head in heads:
            g = session.group_of(head)
            q = seen["q"][:, :, head].float()
            dk = (new_k[:, :, g] - seen["k"][:, :, g]).float()
            delta = torch.einsum("bqd,bkd->bqk", q, dk) * scale
            s[:, head] = s[:, head] + torch.where(causal, delta, 0.0).to(s.dtype)
        return s

    return [
        (attn_hook(layer, session._q_name), _keep(seen, "q")),
        (attn_hook(layer, session._k_name), _keep(seen, "k")),
        (attn_hook(layer, "hook_attn_scores"), scores),
    ]


def _value_hooks(
    session: PatchingSession, layer: int, heads: list[int], new_v: torch.Tensor
) -> list[Hook]:
    """Patch receiver heads' values alone: add `pattern_h @ (v_new - v)` to their `z`."""
    seen: dict[str, torch.Tensor] = {}

    def set_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        for head in heads:
            g = session.group_of(head)
            dv = (new_v[:, :, g] - seen["v"][:, :, g]).float()
            change = torch.einsum("bqk,bkd->bqd", seen["pattern"][:, head].float(), dv)
            z[:, :, head] += change.to(z.dtype)
        return z

    return [
        (attn_hook(layer, "hook_v"), _keep(seen, "v")),
        (attn_hook(layer, "hook_pattern"), _keep(seen, "pattern")),
        (head_z(layer), set_z),
    ]


def _path_to_logits(
    session: PatchingSession,
    senders: Iterable[Head] | None,
    base: str,
    source: str,
    normalise: bool,
) -> torch.Tensor:
    """Sender -> logits: the `base` run's final residual plus the change in the sender's own
    write at the answer position, everything else frozen. No forward pass is needed."""
    rows = torch.arange(session.n, device=session.device)
    final = session.caches[base][FINAL][rows, session.end]
    answers = session.answers.repeat(session.n_heads, 1)
    wanted = None if senders is None else set(senders)
    result = torch.full((session.n_layers, session.n_heads), float("nan"), device=session.device)
    for layer in range(session.n_layers):
        z_base = session.caches[base][head_z(layer)][rows, session.end]
        z_source = session.caches[source][head_z(layer)][rows, session.end]
        delta = head_outputs(session, layer, z_source - z_base)  # (head, n, d_model)
        lds = session._logit_diff((final[None] + delta).flatten(0, 1), answers)
        lds = lds.view(session.n_heads, session.n)
        values = session.normalise(lds) if normalise else lds.mean(-1)
        for head in range(session.n_heads):
            if wanted is None or (layer, head) in wanted:
                result[layer, head] = values[head]
    return result


def head_means(
    session: PatchingSession, groups: torch.Tensor, run: str = "corrupted"
) -> dict[int, torch.Tensor]:
    """Every head's `z` averaged over the prompts of `run` that share a group id (IOI: a
    template, so positions line up), broadcast back to each prompt: `{layer: (n, pos, head,
    d_head)}`, the values that mean-ablation writes (on the session's device)."""
    _check_run(run)
    groups = groups.long().to(session.device)
    means = {}
    for layer in range(session.n_layers):
        z = session.caches[run][head_z(layer)]
        out = torch.empty_like(z)
        for g in groups.unique():
            members = groups == g
            out[members] = z[members].float().mean(0, keepdim=True).to(z.dtype)
        means[layer] = out
    return means


def ablate_heads(
    session: PatchingSession,
    masks: torch.Tensor,
    values: dict[int, torch.Tensor],
    *,
    base: str = "clean",
    normalise: bool = True,
) -> torch.Tensor:
    """Run `base` once per ablation config, with the heads where `masks[c]` (`n_layers,
    n_heads`, bool) is True replaced by `values` (e.g. `head_means`). Returns `(configs,)`."""
    _check_run(base)
    masks = masks.bool().to(session.device)
    if masks.ndim == 2:
        masks = masks[None]
    copies = masks.shape[0]
    touched = [layer for layer in range(session.n_layers) if masks[:, layer].any()]
    if not touched:
        lds = session.logit_diffs[base].repeat(copies, 1)
        return (session.normalise(lds) if normalise else lds.mean(-1)).cpu()
    first = touched[0]
    lds = torch.zeros(copies, session.n, device=session.device)
    for group in session.groups:
        hooks: list[Hook] = []
        for layer in touched:
            keep = ~masks[:, layer][:, None, None, :, None]
            value = values[layer][group.rows][:, : group.width]

            def ablate(z: torch.Tensor, hook: Any, keep: Any = keep, value: Any = value) -> Any:
                return torch.where(keep, _view(z, copies), value[None]).flatten(0, 1)

            hooks.append((head_z(layer), ablate))
        resid = session.take(base, resid_pre(first), group, copies)
        lds[:, group.rows] = session.logit_diff_from(first, resid, group, hooks)
    return (session.normalise(lds) if normalise else lds.mean(-1)).cpu()


def attention_between(
    session: PatchingSession, query: torch.Tensor, key: torch.Tensor, run: str = "clean"
) -> torch.Tensor:
    """Mean attention every head pays from per-prompt position `query` to position `key` in
    `run`: `(n_layers, n_heads)`."""
    _check_run(run)
    rows = torch.arange(session.n, device=session.device)
    query, key = query.long().to(session.device), key.long().to(session.device)
    out = torch.zeros(session.n_layers, session.n_heads, device=session.device)
    for layer in range(session.n_layers):
        pattern = session.caches[run][attn_hook(layer, "hook_pattern")]
        out[layer] = pattern[rows, :, query, key].float().mean(0)
    return out.cpu()

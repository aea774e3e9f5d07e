"""The `Detector` base classes, the inputs detectors read, the registry, and save / load.

Owns what every detector shares: input checks, multi-hook z-scored aggregation, safetensors + JSON.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from madlens.data.jsonl import read_object
from madlens.detectors.backend import (
    check_tensor,
    is_tensor,
    scores,
    take_rows,
    to_device,
    to_float,
    to_numpy,
)
from madlens.errors import MadlensError

__all__ = [
    "DETECTORS",
    "ActivationDetector",
    "Activations",
    "ContrastPairs",
    "Detector",
    "OutputDetector",
    "OutputStats",
    "get_detector",
    "load_detector",
]

Activations: TypeAlias = Any  # np.ndarray | torch.Tensor | Mapping[str, np.ndarray | Tensor]

#: Every registered detector class by its stable kebab-case name.
DETECTORS: dict[str, type[Detector]] = {}

CONFIG_FILE = "detector.json"
STATE_FILE = "state.safetensors"
FORMAT_VERSION = 1

# Multi-hook z-scoring statistics come from at most this many trusted examples (a seeded
# random subset), so that an expensive score (kNN over 100k vectors) stays cheap at fit time.
ZSCORE_MAX_ROWS = 2_000
_AGGREGATIONS = ("mean", "max")


# --- input types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputStats:
    """What output detectors read, as the activation capture returns it.

    `logits`: `(n, vocab)` float array, the logits at the final position of each example.
    `token_logprobs`: `n` 1-D float arrays, the log-probability the model gave to each actual
    next token over the scored span of each example (lengths may differ).
    Either may be None when no detector that needs it is used.
    """

    logits: Any = None
    token_logprobs: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if self.logits is None and self.token_logprobs is None:
            raise MadlensError("OutputStats needs logits, token_logprobs or both")
        if self.logits is not None:
            logits = to_numpy(self.logits)
            if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
                raise MadlensError(f"logits must be (n, vocab) with vocab >= 2, got {logits.shape}")
            object.__setattr__(self, "logits", logits)
        if self.token_logprobs is not None:
            seqs = [to_numpy(seq).reshape(-1) for seq in self.token_logprobs]
            if not seqs:
                raise MadlensError("token_logprobs is empty")
            object.__setattr__(self, "token_logprobs", seqs)
        if self.logits is not None and self.token_logprobs is not None:
            if len(self.logits) != len(self.token_logprobs):
                raise MadlensError(
                    f"{len(self.logits)} rows of logits but "
                    f"{len(self.token_logprobs)} token_logprobs sequences"
                )

    def __len__(self) -> int:
        return len(self.logits) if self.logits is not None else len(self.token_logprobs)


@dataclass(frozen=True)
class ContrastPairs:
    """Activations of contrast pairs for the defection probe: row i of `positive` and of
    `negative` come from the two completions of pair i (e.g. "…dangerous? yes" / "…? no").

    Each is an `n x d` array or a `dict[hook, n x d]` with the hooks the detector is fit on.
    """

    positive: Activations
    negative: Activations


def as_matrix(x: Any, what: str = "activations", convert: bool = True) -> np.ndarray:
    """Check that `x` is a non-empty `n x d` float array; return it as float32/float64.

    With `convert=False` the array is returned as stored (e.g. a float16 memmap), for callers
    that convert it chunk by chunk; its finiteness is then the caller's to check.
    """
    arr = to_numpy(x)
    if arr.ndim != 2:
        raise MadlensError(f"{what} must be an n x d array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MadlensError(f"{what} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise MadlensError(f"{what} must be numeric, got dtype {arr.dtype}")
    if not convert:
        return arr
    arr = to_float(arr)
    if not np.isfinite(arr).all():
        raise MadlensError(f"{what} contains NaN or infinite values")
    return arr


def as_rows(x: Any, what: str = "activations", convert: bool = True) -> Any:
    """`as_matrix`, except that a torch tensor stays a tensor on its own device (the device
    path of the detectors that declare `tensor_inputs`)."""
    return check_tensor(x, what, convert) if is_tensor(x) else as_matrix(x, what, convert)


def _is_stream(x: Any) -> bool:
    """An iterable of batches rather than one array or one dict of arrays."""
    if isinstance(x, np.ndarray | Mapping | str | bytes) or hasattr(x, "detach"):
        return False
    return isinstance(x, Iterable | Iterator)


def progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    """A progress bar for loops long enough to deserve one (on a terminal only)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if total >= 8 else True)


def chunks(n: int, size: int) -> range:
    return range(0, n, max(1, size))


# --- parameter rules ---------------------------------------------------------------------------

#: A parameter rule: (name, value) -> what is wrong with the value, or None.
Rule: TypeAlias = Callable[[str, Any], "str | None"]


def integer(low: int = 0, optional: bool = False) -> Rule:
    """An int (not a bool) >= `low`; None too when `optional`."""

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            return f"{name} must be an int >= {low}{' or None' if optional else ''}, got {value!r}"
        return None

    return check


def real(low: float = 0.0, strict: bool = True, high: float | None = None) -> Rule:
    """A finite number above `low` (or at least `low` unless `strict`), at most `high`."""

    def check(name: str, value: Any) -> str | None:
        ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
        ok = ok and np.isfinite(value) and (value > low if strict else value >= low)
        ok = ok and (high is None or value <= high)
        if not ok:
            bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high else "")
            return f"{name} must be a number {bound}, got {value!r}"
        return None

    return check


def choice(*allowed: Any) -> Rule:
    """One of `allowed` (compared with ==)."""

    def check(name: str, value: Any) -> str | None:
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        return None

    return check


def either(*rules: Rule) -> Rule:
    """Any one of `rules` (the first rule's message when none fits)."""

    def check(name: str, value: Any) -> str | None:
        problems = [rule(name, value) for rule in rules]
        return None if None in problems else problems[0]

    return check


def path(optional: bool = True) -> Rule:
    """A file-system path (str or Path); None too when `optional`."""

    def check(name: str, value: Any) -> str | None:
        if (value is None and optional) or isinstance(value, str | Path):
            return None
        return f"{name} must be a path{' or None' if optional else ''}, got {value!r}"

    return check


BOOLEAN = choice(True, False)
SEED = integer(0)


# --- registry ----------------------------------------------------------------------------------


def get_detector(name: str, **params: Any) -> Detector:
    """Build a registered detector by name: `get_detector("knn", k=10)`."""
    if name not in DETECTORS:
        raise MadlensError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    try:
        return DETECTORS[name](**params)
    except TypeError as exc:
        raise MadlensError(f"bad parameters for detector {name!r}: {exc}") from exc


def load_detector(path: str | Path) -> Detector:
    """Load any detector saved with `Detector.save`."""
    return Detector.load(path)


# --- base classes ------------------------------------------------------------------------------


class Detector:
    """Base of every detector: learns "normal" from trusted inputs and scores new inputs.

    scikit-learn conventions: parameters are the `__init__` arguments, stored unchanged under
    the same names; what `fit` learns lives in attributes ending in `_`; `fit` returns `self`.
    Scores: higher = more anomalous, one float per example.

    `save(dir)` writes `dir/detector.json` (name, parameters, scalar state) and
    `dir/state.safetensors` (every learned array); `load(dir)` rebuilds it. No pickle.

    What a detector needs is declared on its class, so that the bench and the monitor ask
    rather than switch on names:
      name            stable registry name (kebab-case)
      input_kind      "activations" (hook activations), "outputs" (logits / token log-probs)
                      or "transcripts" (it queries the model about whole conversations)
      contrast_source "none"; "generic" (contrast pairs that name no task, e.g. the defection
                      probe's yes/no questions); "refusal" (project-written harmful and
                      harmless instructions, the refusal direction's); or "task" (the
                      task's own pairs, e.g. CCS)
      supervised      True when `fit` sees anomaly labels (`labels=`): such detectors are
                      cross-fitted and always shown apart from label-free ones
      uses_untrusted  True if `fit` needs the unlabeled untrusted batch (QUE, spectral)
      reads_measurements  True if `fit` needs each trusted and untrusted input's observed
                      measurements (`measured=`: whether all read positive; the exclusion
                      probe of measurement-tampering detection)
      reference       the paper or source the detector implements
    `defaults_for(n_trusted)` gives parameters that depend on the trusted-set size.
    """

    name: ClassVar[str] = ""
    #: Allowed values of `__init__` parameters (checked by `fit`): name -> rule.
    param_rules: ClassVar[dict[str, Rule]] = {}
    input_kind: ClassVar[str] = "activations"
    contrast_source: ClassVar[str] = "none"
    supervised: ClassVar[bool] = False
    uses_untrusted: ClassVar[bool] = False
    reads_measurements: ClassVar[bool] = False
    reference: ClassVar[str] = ""
    # Learned attributes that are rebuilt by `_after_load` instead of being saved.
    _unsaved: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if name in DETECTORS and DETECTORS[name] is not cls:
                raise RuntimeError(f"two detectors named {name!r}")
            DETECTORS[name] = cls

    @classmethod
    def fit_requires(cls) -> tuple[str, ...]:
        """The keyword inputs `fit` needs, from the declarations: `labels` (supervised),
        `contrast` (any contrast source), `measured` (reads measurements)."""
        return (
            (("labels",) if cls.supervised else ())
            + (("contrast",) if cls.contrast_source != "none" else ())
            + (("measured",) if cls.reads_measurements else ())
        )

    @classmethod
    def defaults_for(cls, n_trusted: int) -> dict[str, Any]:
        """Parameters that depend on the trusted-set size (none by default)."""
        return {}

    @classmethod
    def cannot_read(cls, inputs: Sequence[Any]) -> str | None:
        """Why the detector cannot run on these task inputs (texts or conversations), or
        None when it can: the bench turns a reason into an `n/a` row."""
        return None

    @classmethod
    def read_transcripts(cls, model: Any, transcripts: Sequence[Any], progress: bool = True) -> Any:
        """For `input_kind = "transcripts"`: the rows `fit` and `score` read, obtained by
        querying `model` about each transcript (a conversation ending with an answer)."""
        raise NotImplementedError(f"{cls.name} does not read transcripts")

    @classmethod
    def summary(cls) -> str:
        """The first sentence of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")

    # parameters -------------------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as passed."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _clone(self) -> Detector:
        return type(self)(**self.get_params())

    # fitting and scoring ----------------------------------------------------------------------

    def fit(self, trusted: Any, untrusted: Any = None, **fit_inputs: Any) -> Detector:
        raise NotImplementedError

    def score(self, batch: Any) -> np.ndarray:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise MadlensError(f"{self.name or type(self).__name__} is not fitted: call fit first")

    def _check_params(self) -> None:
        """Fail with one line on a parameter outside its rule (every class up the MRO)."""
        for klass in type(self).__mro__:
            for name, rule in vars(klass).get("param_rules", {}).items():
                problem = rule(name, getattr(self, name))
                if problem:
                    raise MadlensError(f"{self.name}: {problem}")

    def _check_fit_inputs(self, fit_inputs: dict[str, Any]) -> None:
        self._check_params()
        required = self.fit_requires()
        unknown = set(fit_inputs) - set(required)
        if unknown:
            raise MadlensError(
                f"{self.name} does not take {', '.join(sorted(unknown))} in fit"
                + (f" (it takes {', '.join(required)})" if required else "")
            )
        missing = [k for k in required if fit_inputs.get(k) is None]
        if missing:
            raise MadlensError(f"{self.name} needs {', '.join(missing)}= in fit")

    def _reset(self) -> None:
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)
        vars(self).pop("_on_device", None)

    # saving -----------------------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state: arrays for safetensors, everything else for JSON."""
        arrays: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_") or key in self._unsaved:
                continue
            if key == "per_hook_":
                continue
            if isinstance(value, np.ndarray):
                arrays[key] = np.ascontiguousarray(value)
            elif isinstance(value, np.generic):
                values[key] = value.item()
            else:
                values[key] = value
        return arrays, values

    def save(self, path: str | Path) -> None:
        """Write `path/detector.json` and `path/state.safetensors` (creates the folder)."""
        self._check_fitted()
        from madlens import __version__

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        arrays, values = self._state()
        hooks: dict[str, Any] | None = None
        for hook, det in getattr(self, "per_hook_", {}).items():
            hook_arrays, hook_values = det._state()
            arrays.update({f"{hook}/{k}": v for k, v in hook_arrays.items()})
            hooks = hooks or {}
            hooks[hook] = hook_values
        config = {
            "format": FORMAT_VERSION,
            "madlens_version": __version__,
            "detector": self.name,
            "params": self.get_params(),
            "state": values,
            "hooks": hooks,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(arrays, str(folder / STATE_FILE))

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """Rebuild a detector written by `save`; called on a subclass it checks the type."""
        folder = Path(path)
        config, arrays = _read_saved(folder)
        name = config["detector"]
        if name not in DETECTORS:
            raise MadlensError(f"{folder}: unknown detector {name!r}")
        det_cls = DETECTORS[name]
        if not issubclass(det_cls, cls):
            raise MadlensError(f"{folder} holds a {name!r} detector, not a {cls.__name__}")
        try:
            det = det_cls(**config["params"])
        except TypeError as exc:
            raise MadlensError(f"{folder}/{CONFIG_FILE}: bad params for {name!r}: {exc}") from exc
        det._check_params()
        hooks = config.get("hooks") or {}
        per_hook = {hook: det._clone() for hook in hooks}
        for key, value in arrays.items():
            hook, _, attr = key.rpartition("/")
            if (hook and hook not in per_hook) or not _is_learned(attr):
                raise MadlensError(f"{folder}/{STATE_FILE}: unexpected array {key!r}")
            setattr(per_hook[hook] if hook else det, attr, value)
        for target, values in [(det, config["state"])] + [
            (per_hook[h], v) for h, v in hooks.items()
        ]:  # fmt: skip
            if not isinstance(values, dict) or not all(map(_is_learned, values)):
                raise MadlensError(f"{folder}/{CONFIG_FILE}: malformed learned state")
            for key, value in values.items():
                setattr(target, key, value)
        for sub in per_hook.values():
            sub._after_load()
        if per_hook:
            det.per_hook_ = per_hook
        if not det.is_fitted:
            raise MadlensError(f"{folder}: the saved detector holds no learned state")
        det._after_load()
        return det

    def _after_load(self) -> None:
        """Rebuild unsaved state (see `_unsaved`) after `load`."""


class ActivationDetector(Detector):
    """A detector on activations: one `n x d` array, or a dict of them keyed by hook name.

    An array may be numpy, a torch tensor or a memmap; float16 / bfloat16 are computed in
    float32. Given a dict (the same `n` examples at several hooks), the detector fits one copy
    of itself per hook (`per_hook_`), scores a seeded sample of at most `ZSCORE_MAX_ROWS`
    trusted examples with each, and keeps each hook's score mean and standard deviation
    (`hook_loc_`, `hook_scale_`); a batch's score is the `mean` (or `max`, per `aggregation`)
    over hooks of the z-scored hook scores.

    Subclasses implement `_fit(trusted, untrusted, **fit_inputs)` and `_score(x)` for one hook
    (arrays already checked); the base class handles hooks and aggregation. Detectors whose
    `streaming` is True also accept an iterable of batches (arrays or dicts) as `trusted`, for
    trusted sets larger than memory.

    Detectors whose `tensor_inputs` is True receive torch tensors as tensors (on their device,
    converted like numpy) and compute there (see `backend`); the others get numpy. Either
    way learned state is numpy and `score` returns numpy float64, so a detector fit on tensors
    scores numpy and the reverse.
    """

    input_kind = "activations"
    streaming: ClassVar[bool] = False
    tensor_inputs: ClassVar[bool] = False
    param_rules = {"aggregation": choice(*_AGGREGATIONS)}

    def __init__(self, aggregation: str = "mean") -> None:
        self.aggregation = aggregation

    def fit(
        self, trusted: Activations, untrusted: Activations | None = None, **fit_inputs: Any
    ) -> ActivationDetector:
        """Learn from trusted activations (and untrusted ones, for detectors that use them)."""
        self._check_fit_inputs(fit_inputs)
        if self.uses_untrusted and untrusted is None:
            raise MadlensError(f"{self.name} needs the untrusted batch: fit(trusted, untrusted)")
        self._reset()
        if _is_stream(trusted):
            if not self.streaming:
                raise MadlensError(
                    f"{self.name} needs trusted activations as an array or a dict of arrays; "
                    "only moment-based detectors (mahalanobis, pca-residual) take a stream"
                )
            self._fit_stream(trusted, untrusted, fit_inputs)
            return self
        if isinstance(trusted, Mapping):
            hooks = _hook_names(trusted, "trusted")
            if untrusted is not None:
                _check_same_hooks(untrusted, hooks, "untrusted")
            n = _common_length(trusted, hooks, "trusted")
            fitted = {}
            for hook in hooks:
                det = self._clone()
                det._fit_checked(
                    trusted[hook],
                    None if untrusted is None else untrusted[hook],
                    {k: _select_hook(v, hook) for k, v in fit_inputs.items()},
                )
                fitted[hook] = det
            rows = _zscore_rows(n)
            samples = {
                hook: self._matrix(take_rows(trusted[hook], rows), f"trusted[{hook!r}]")
                for hook in hooks
            }
            self._set_hooks(fitted, samples)
            return self
        if isinstance(untrusted, Mapping):
            raise MadlensError("trusted is one array but untrusted is a dict of hooks")
        self._fit_checked(trusted, untrusted, fit_inputs)
        return self

    def _matrix(self, x: Any, what: str, convert: bool = True) -> Any:
        """The checked `n x d` input: a tensor stays one for `tensor_inputs` detectors."""
        return as_rows(x, what, convert) if self.tensor_inputs else as_matrix(x, what, convert)

    def _learned(self, name: str, ref: Any) -> Any:
        """Learned array `name` in the kind of `ref`: itself for numpy, else a tensor on ref's
        device, copied there once and kept (until the attribute is replaced or refit)."""
        value = getattr(self, name)
        if not is_tensor(ref):
            return value
        cache = vars(self).setdefault("_on_device", {})
        hit = cache.get((name, ref.device))
        if hit is None or hit[0] is not value:
            hit = cache[(name, ref.device)] = (value, to_device(value, ref.device))
        return hit[1]

    def _set_learned(self, name: str, tensor: Any) -> None:
        """Store a learned array computed as `tensor` (numpy, or a tensor kept as the device
        copy of the numpy attribute)."""
        value = to_numpy(tensor)
        setattr(self, name, value)
        if is_tensor(tensor):
            vars(self).setdefault("_on_device", {})[(name, tensor.device)] = (value, tensor)

    def _fit_checked(self, trusted: Any, untrusted: Any, fit_inputs: dict[str, Any]) -> None:
        trusted = self._matrix(trusted, "trusted", convert=not self.streaming)
        if untrusted is not None:
            untrusted = self._matrix(untrusted, "untrusted")
            _check_width(untrusted, trusted.shape[1], "untrusted")
        self.n_features_in_ = int(trusted.shape[1])
        self._fit(trusted, untrusted, **fit_inputs)

    def _set_hooks(self, fitted: dict[str, ActivationDetector], samples: dict[str, Any]) -> None:
        loc, scale = [], []
        for hook, det in fitted.items():
            s = scores(det._trusted_scores(samples[hook]))
            loc.append(float(np.mean(s)))
            std = float(np.std(s))
            # a hook whose trusted scores are constant gets unit scale rather than a 0 division
            scale.append(std if std > 0 else 1.0)
        self.hooks_ = list(fitted)
        self.per_hook_ = fitted
        self.hook_loc_ = np.array(loc)
        self.hook_scale_ = np.array(scale)

    def _fit_stream(self, batches: Iterable, untrusted: Any, fit_inputs: dict[str, Any]) -> None:
        from madlens.detectors.gaussian import StreamingMoments

        moments: dict[str | None, StreamingMoments] = {}
        reservoir = _Reservoir(ZSCORE_MAX_ROWS)
        hooks: list[str] | None = None
        for batch in batches:
            if isinstance(batch, Mapping):
                if hooks is None:
                    if moments:
                        raise MadlensError("a stream mixes arrays and dicts of hooks")
                    hooks = _hook_names(batch, "trusted batch")
                _check_same_hooks(batch, hooks, "trusted batch")
                _common_length(batch, hooks, "trusted batch")
                for hook in hooks:
                    moments.setdefault(hook, StreamingMoments()).update(batch[hook])
                reservoir.add({hook: batch[hook] for hook in hooks})
            else:
                if hooks is not None:
                    raise MadlensError("a stream mixes arrays and dicts of hooks")
                moments.setdefault(None, StreamingMoments()).update(batch)
        if not moments:
            raise MadlensError("the trusted stream yielded no batches")
        if hooks is None:
            self.n_features_in_ = moments[None].n_features
            self._fit_moments(moments[None])
            return
        fitted = {}
        for hook in hooks:
            det = self._clone()
            det.n_features_in_ = moments[hook].n_features
            det._fit_moments(moments[hook])
            fitted[hook] = det
        self._set_hooks(fitted, reservoir.rows)

    def score(self, batch: Activations) -> np.ndarray:
        """Anomaly score per example (higher = more anomalous), aggregated over hooks."""
        per_hook = self.score_per_hook(batch)
        if not isinstance(per_hook, dict):
            return per_hook
        stacked = np.stack(list(per_hook.values()))
        return stacked.max(0) if self.aggregation == "max" else stacked.mean(0)

    def score_per_hook(self, batch: Activations) -> dict[str, np.ndarray] | np.ndarray:
        """z-scored scores per hook (a dict) for a multi-hook detector; plain scores otherwise."""
        self._check_fitted()
        hooks = getattr(self, "hooks_", None)
        if hooks is None:
            if isinstance(batch, Mapping):
                raise MadlensError("this detector was fit on one array; score it on one array")
            return self._score_checked(batch)
        if not isinstance(batch, Mapping):
            raise MadlensError(f"this detector was fit on hooks {hooks}; score a dict of them")
        missing = [h for h in hooks if h not in batch]
        if missing:
            raise MadlensError(f"batch lacks hooks {missing} the detector was fit on")
        _common_length(batch, hooks, "batch")
        return {
            hook: (self.per_hook_[hook]._score_checked(batch[hook]) - loc) / scale
            for hook, loc, scale in zip(hooks, self.hook_loc_, self.hook_scale_, strict=True)
        }

    def _score_checked(self, x: Any) -> np.ndarray:
        x = self._matrix(x, "batch")
        _check_width(x, self.n_features_in_, "batch")
        return scores(self._score(x))

    def _trusted_scores(self, trusted_sample: Any) -> Any:
        """Scores of trusted rows for z-scoring hooks (kNN overrides it to skip self-matches)."""
        return self._score(trusted_sample)

    # to implement ---------------------------------------------------------------------------

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None, **fit_inputs: Any) -> None:
        raise NotImplementedError

    def _fit_moments(self, moments: Any) -> None:
        raise NotImplementedError

    def _score(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OutputDetector(Detector):
    """A detector on output statistics (`OutputStats`); it learns nothing from trusted data.

    `fit` only validates its input; `score` works without it. For convenience a bare
    `(n, vocab)` array is taken as logits and a list of 1-D arrays as token log-probs.
    """

    input_kind = "outputs"
    needs: ClassVar[str] = "logits"  # or "token_logprobs"

    def fit(self, trusted: Any, untrusted: Any = None, **fit_inputs: Any) -> OutputDetector:
        """Validate the trusted output statistics; nothing is learned."""
        self._check_fit_inputs(fit_inputs)
        self.n_trusted_ = len(self._stats(trusted, "trusted"))
        return self

    def score(self, batch: Any) -> np.ndarray:
        """Anomaly score per example (higher = more anomalous)."""
        self._check_params()
        return np.asarray(self._score(self._stats(batch, "batch")), dtype=np.float64)

    def _stats(self, x: Any, what: str) -> OutputStats:
        if not isinstance(x, OutputStats):
            if isinstance(x, Mapping):
                raise MadlensError(f"{self.name} reads OutputStats, not activations per hook")
            x = OutputStats(logits=x) if self.needs == "logits" else OutputStats(token_logprobs=x)
        if getattr(x, self.needs) is None:
            raise MadlensError(f"{self.name} needs OutputStats.{self.needs} in the {what} data")
        return x

    def _score(self, stats: OutputStats) -> np.ndarray:
        raise NotImplementedError


# --- helpers -----------------------------------------------------------------------------------


def _is_learned(attr: Any) -> bool:
    return isinstance(attr, str) and attr.endswith("_") and not attr.startswith("_")


def _read_saved(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config and arrays of a saved detector, each problem one line naming the file."""
    if not folder.is_dir():
        raise MadlensError(f"no saved detector at {folder}: not a directory")
    config_path, state_path = folder / CONFIG_FILE, folder / STATE_FILE
    for file in (config_path, state_path):
        if not file.is_file():
            raise MadlensError(f"no saved detector in {folder}: {file.name} is missing")
    config = read_object(config_path)
    if config.get("format") != FORMAT_VERSION:
        raise MadlensError(f"{folder}: unsupported detector format {config.get('format')!r}")
    kinds = {"detector": str, "params": dict, "state": dict}
    for field_name, kind in kinds.items():
        if not isinstance(config.get(field_name), kind):
            raise MadlensError(f"{config_path}: '{field_name}' must be a {kind.__name__}")
    if not isinstance(config.get("hooks") or {}, dict):
        raise MadlensError(f"{config_path}: 'hooks' must be an object or null")
    try:
        arrays = load_file(str(state_path))
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise MadlensError(f"{state_path} is not a valid safetensors file: {exc}") from exc
    return config, arrays


def _hook_names(acts: Mapping, what: str) -> list[str]:
    hooks = list(acts)
    if not hooks:
        raise MadlensError(f"{what} is an empty dict of hooks")
    for hook in hooks:
        if not isinstance(hook, str) or not hook:
            raise MadlensError(f"{what}: hook names must be non-empty strings, got {hook!r}")
    return hooks


def _check_same_hooks(acts: Any, hooks: list[str], what: str) -> None:
    if not isinstance(acts, Mapping):
        raise MadlensError(f"{what} must be a dict of hooks like trusted")
    if set(acts) != set(hooks):
        raise MadlensError(f"{what} has hooks {sorted(acts)}, trusted has {sorted(hooks)}")


def _common_length(acts: Mapping, hooks: list[str], what: str) -> int:
    lengths = {hook: len(acts[hook]) for hook in hooks}
    if len(set(lengths.values())) != 1:
        raise MadlensError(f"{what}: hooks hold different numbers of examples: {lengths}")
    return lengths[hooks[0]]


def _check_width(x: Any, width: int, what: str) -> None:
    if x.shape[1] != width:
        raise MadlensError(f"{what} has {x.shape[1]} features, the detector was fit on {width}")


def _select_hook(value: Any, hook: str) -> Any:
    """The part of a fit input that belongs to one hook (labels are shared by all hooks)."""
    if isinstance(value, Mapping):
        if hook not in value:
            raise MadlensError(f"fit input lacks hook {hook!r}")
        return value[hook]
    if isinstance(value, ContrastPairs):
        return ContrastPairs(_select_hook(value.positive, hook), _select_hook(value.negative, hook))
    return value


def _zscore_rows(n: int) -> np.ndarray:
    if n <= ZSCORE_MAX_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, ZSCORE_MAX_ROWS, replace=False))


class _Reservoir:
    """A uniform random sample of rows from a stream (bottom-k of random keys), seeded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(0)
        self.keys = np.empty(0)
        self.rows: dict[str, np.ndarray] = {}

    def add(self, batch: dict[str, Any]) -> None:
        """Add a batch (arrays or tensors by hook); only the rows that enter the sample are
        converted (copied to the host), so a stream on a device is not copied whole."""
        n = len(next(iter(batch.values())))
        seen = len(self.keys)
        keys = np.concatenate([self.keys, self.rng.random(n)])
        keep = np.argsort(keys)[: self.size]
        self.keys = keys[keep]
        new = np.sort(keep[keep >= seen]) - seen  # the batch rows kept
        where = np.where(keep < seen, keep, seen + np.searchsorted(new, keep - seen))
        for hook, rows in batch.items():
            old = self.rows.get(hook)
            if len(new):
                picked = as_matrix(take_rows(rows, new), f"trusted batch[{hook!r}]")
                old = picked[:0] if old is None else old
                old = np.concatenate([old, picked])
            self.rows[hook] = old[where]

"""Recipes: a YAML file that describes a run completely, validated on load so a typo fails before training.

Every key has a default (or is required); `load_recipe` returns the resolved recipe, a plain nested dict with
every key filled in, which the trainer saves next to its results. Errors name the key:
`recipe key 'optimizer.lr': expected a positive number, got 'abc'`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from hyperflux import data, models
from hyperflux.baselines import phase_end

# `method`: hyperflux in exact-target mode, the paper's form, or one of the baselines it is compared with.
HYPERFLUX_METHODS = ("hyperflux", "hyperflux-paper")
BASELINE_METHODS = ("magnitude", "gmp", "imp", "taylor", "rigl", "random")
# Model arguments the trainer fills in from the data set.
DATA_DERIVED_ARGS = ("num_classes", "in_channels", "image_size")


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, bad value, unreadable file. The message names the key."""


class _Bad(Exception):
    """Raised by a checker with what it expected; `Field` turns it into a `RecipeError` naming the key."""


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    default: Any
    check: Callable[[Any], Any]


# ----------------------------------------------------------------- value checkers
def _number(value: Any) -> float:
    # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted
    if isinstance(value, bool):
        raise _Bad("a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Bad("a number") from None
    if not math.isfinite(number):
        raise _Bad("a finite number")
    return number


def _number_where(value: Any, holds: Callable[[float], bool], wanted: str) -> float:
    """`value` as a number for which `holds`, else `_Bad(wanted)`, whatever was wrong with it."""
    try:
        number = _number(value)
    except _Bad:
        raise _Bad(wanted) from None
    if not holds(number):
        raise _Bad(wanted)
    return number


def positive(value: Any) -> float:
    return _number_where(value, lambda x: x > 0, "a positive number")


def positive_up_to(maximum: float) -> Callable[[Any], float]:
    """A positive number no larger than `maximum`: beyond it the controller's pressure or the logits'
    initial draw overflow float."""
    return lambda value: _number_where(
        value, lambda x: 0 < x <= maximum, f"a positive number up to {maximum:g}"
    )


def non_negative(value: Any) -> float:
    return _number_where(value, lambda x: x >= 0, "a number >= 0")


def fraction_open(value: Any) -> float:
    """A sparsity: strictly between 0 and 1."""
    return _number_where(value, lambda x: 0 < x < 1, "a fraction in (0, 1) (0.98 means 98%)")


def unit_interval(value: Any) -> float:
    return _number_where(value, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def decay_factor(value: Any) -> float:
    return _number_where(value, lambda x: 0 < x <= 1, "a number in (0, 1]")


def integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    wanted = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _Bad(wanted)
        try:
            number = int(value)
        except ValueError:
            raise _Bad(wanted) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise _Bad(wanted)
        return number

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad("a non-empty string")
    return value


def run_name(value: Any) -> str:
    """A run's name, which names its folder under runs/: one path component."""
    name = string(value)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise _Bad("a name without / or \\ (it names the run's folder under runs/; --out puts it elsewhere)")
    return name


def choice(options: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, bool):  # YAML reads `off` and `on` (and yes/no) as booleans
            value = "on" if value else "off"
        if value not in options:
            raise _Bad(f"one of {', '.join(options)}")
        return value

    return check


def model_name(value: Any) -> str:
    """A registry name, or `package.module:Factory` importable now."""
    if not isinstance(value, str) or (":" not in value and value not in models.names()):
        raise _Bad(f"one of {', '.join(models.names())}, or package.module:Factory for a model of your own")
    try:
        models.factory(value)
    except ValueError as error:
        reason = str(error).removeprefix(f"model {value!r}: ")
        raise _Bad(f"an importable package.module:Factory ({reason})") from None
    return value


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check_optional(value: Any) -> Any:
        return None if value is None else check(value)

    return check_optional


def below_one(value: Any) -> float:
    """A momentum or a label smoothing: 1 would keep no gradient or no label."""
    return _number_where(value, lambda x: 0 <= x < 1, "a number in [0, 1)")


def betas(value: Any) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _Bad("a list of two numbers in [0, 1)")
    try:
        return [below_one(v) for v in value]
    except _Bad:
        raise _Bad("a list of two numbers in [0, 1)") from None


def patterns(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Bad("a regular expression or a list of them")
    return list(value)


def device(value: Any) -> str:
    if not isinstance(value, str) or not (
        value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        raise _Bad("auto, cpu, cuda, cuda:N or mps")
    return value


def module_types(value: Any) -> list[str]:
    """Names of torch.nn module classes (`Linear`, `Conv2d`, `Embedding`, ...)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise _Bad("a list of torch.nn module names such as [Linear, Conv2d]")
    for name in names:
        kind = getattr(nn, str(name), None)
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise _Bad(f"torch.nn module names such as [Linear, Conv2d] ({name!r} is not one)")
    return list(names)


def overrides(value: Any) -> dict[str, dict[str, float]]:
    shape = "a mapping {pattern: {min_density: x, pressure_scale: y}}"
    if not isinstance(value, dict):
        raise _Bad(shape)
    checks = {"min_density": unit_interval, "pressure_scale": non_negative}
    out = {}
    for pattern, settings in value.items():
        if not isinstance(pattern, str) or not isinstance(settings, dict):
            raise _Bad(shape)
        out[pattern] = {}
        for key, setting in settings.items():
            if key not in checks:
                raise _Bad(f"{shape}; {pattern!r} has {key!r}, which is neither")
            try:
                out[pattern][key] = checks[key](setting)
            except _Bad as bad:
                raise _Bad(f"{shape}; {pattern!r}: {key} must be {bad}") from None
    return out


def pressure_list(value: Any) -> list[float]:
    if not isinstance(value, list) or not value:
        raise _Bad("a non-empty list of pressures >= 0, one per period")
    return [non_negative(v) for v in value]


# ----------------------------------------------------------------- the schema
SCHEMA: dict[str, Any] = {
    "name": Field(None, optional(run_name)),
    "seed": Field(0, integer(0, 2**32 - 1)),  # numpy's seeds
    "device": Field("auto", device),
    "amp": Field("off", choice(("off", "fp16", "bf16"))),
    # auto: on for models with a Conv2d trained on the CPU (see training.use_channels_last)
    "channels_last": Field("auto", choice(("auto", "on", "off"))),
    "threads": Field(None, optional(integer(1, 1024))),
    # None: hyperflux or hyperflux-paper as hyperflux.exact_target says
    "method": Field(None, optional(choice((*HYPERFLUX_METHODS, *BASELINE_METHODS)))),
    "data": {
        "name": Field(_REQUIRED, choice(data.names())),
        "root": Field(None, optional(string)),
        "augment": Field(None, optional(boolean)),
        "image_size": Field(224, integer(1)),
        "num_workers": Field(0, integer(0)),
        "holdout": Field(0, integer(0)),
        "train_subset": Field(None, optional(integer(1))),
    },
    # other keys of `model` are the model's own arguments (checked against its signature)
    "model": {
        "name": Field(_REQUIRED, model_name),
        "init_checkpoint": Field(None, optional(string)),
    },
    "train": {
        "batch_size": Field(128, integer(1)),
        "eval_batch_size": Field(1000, integer(1)),
        "label_smoothing": Field(0.1, below_one),
        "eval_every": Field(1, integer(1)),
        "controller_every": Field(None, optional(integer(1))),
        "grad_clip": Field(None, optional(positive)),
    },
    "optimizer": {
        "name": Field("sgd", choice(("sgd", "adam", "adamw"))),
        "lr": Field(0.1, positive),
        "lr_end": Field(None, optional(non_negative)),
        "lr_reset": Field(1e-3, non_negative),
        "lr_final": Field(1e-4, non_negative),
        "momentum": Field(0.9, below_one),
        "nesterov": Field(False, boolean),
        "betas": Field([0.9, 0.999], betas),
        "weight_decay": Field(0.0, non_negative),
        "decay_pruned_weights": Field(False, boolean),
        "decay_bias_and_norm": Field(True, boolean),
    },
    "hyperflux": {
        "target_sparsity": Field(None, optional(fraction_open)),
        "pressure": Field(None, optional(non_negative)),
        "pressure_schedule": Field(None, optional(pressure_list)),
        "pruning_epochs": Field(_REQUIRED, integer(1)),
        "regrowth_epochs": Field(0, integer(0)),
        "exact_target": Field(True, boolean),
        "modules": Field(["Linear", "Conv1d", "Conv2d", "Conv3d"], module_types),
        "names": Field(None, optional(patterns)),
        "ignore": Field(None, optional(patterns)),
        "overrides": Field(None, optional(overrides)),
        "min_density": Field(0.0, unit_interval),
        "delta": Field(0.3, positive_up_to(100)),
        "regrowth_delta": Field(None, optional(positive_up_to(100))),
        "aggressivity": Field(6.0, positive),
        "exponent": Field(1.5, positive_up_to(10)),
        "grad_scale": Field(0.25, positive),
        "init_logit": Field(0.2, positive_up_to(1000)),
        "mask_lr": Field(1e-3, non_negative),
        "regrowth_mask_lr": Field(None, optional(non_negative)),
        "mask_betas": Field([0.9, 0.999], betas),
        "regrowth_decay": Field(0.75, decay_factor),
        "freeze_after": Field(None, optional(integer(0))),
        "flux_every": Field(8, integer(0)),
    },
    # the baselines' schedules, in epochs from 0 (None: the method's default; see hyperflux.baselines); they
    # share hyperflux.target_sparsity, the selection keys and the budget (pruning + regrowth epochs)
    "baseline": {
        "prune_epoch": Field(None, optional(integer(0))),  # magnitude
        "start_epoch": Field(None, optional(integer(0))),  # gmp, taylor
        "end_epoch": Field(None, optional(integer(1))),  # gmp, taylor, rigl
        "update_every": Field(None, optional(integer(1))),  # gmp, rigl, taylor: steps between mask updates
        "rewind_epoch": Field(None, optional(integer(0))),  # imp
        "prune_fraction": Field(0.2, fraction_open),  # imp: of the remaining weights per round
        # imp: the share of the budget the final mask trains for (None: an equal share with every round)
        "final_share": Field(None, optional(fraction_open)),
        "drop_fraction": Field(0.3, fraction_open),  # rigl: at the start, cosine-decayed to 0
    },
    # `hyperflux train` (dense baseline): epochs None reuses the pruning run's epochs and lr schedule
    "dense": {
        "epochs": Field(None, optional(integer(1))),
        "lr": Field(None, optional(positive)),
        "lr_end": Field(0.0, non_negative),
    },
}


# ----------------------------------------------------------------- validation
def _unknown(path: str, key: str, known: Sequence[str]) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"
    return RecipeError(f"recipe key '{path}': unknown key{hint}")


def _validate(raw: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, open_keys: bool) -> dict:
    out: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str):
            raise RecipeError(f"recipe key {prefix}{key!r}: keys must be strings")
        if key not in schema and not open_keys:
            raise _unknown(prefix + key, key, list(schema))
    for key, spec in schema.items():
        path = prefix + key
        if isinstance(spec, dict):
            section = raw.get(key, {})
            if section is None:
                section = {}
            if not isinstance(section, Mapping):
                raise RecipeError(f"recipe key '{path}': expected a mapping of keys, got {section!r}")
            out[key] = _validate(section, spec, path + ".", open_keys=key == "model")
            continue
        if key not in raw or (raw[key] is None and spec.default is _REQUIRED):
            if spec.default is _REQUIRED:
                raise RecipeError(f"recipe key '{path}': required")
            out[key] = copy.deepcopy(spec.default)
            continue
        try:
            out[key] = spec.check(raw[key])
        except _Bad as bad:
            raise RecipeError(f"recipe key '{path}': expected {bad}, got {raw[key]!r}") from None
    if open_keys:
        out.update({k: v for k, v in raw.items() if k not in schema})
    return out


def evaluation_split(recipe: Mapping[str, Any]) -> str:
    """What a run's accuracy is measured on: "holdout" (training samples set aside) or "test"."""
    return "holdout" if recipe["data"]["holdout"] else "test"


def _check_model_args(model: dict[str, Any]) -> None:
    """The model section's extra keys must be arguments of the model's constructor."""
    parameters = inspect.signature(models.factory(model["name"])).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    accepted = [
        name
        for name, p in parameters.items()
        if name not in DATA_DERIVED_ARGS and p.kind is not p.VAR_KEYWORD
    ]
    for key in model:
        if key in ("name", "init_checkpoint"):
            continue
        if key in DATA_DERIVED_ARGS:
            raise RecipeError(f"recipe key 'model.{key}': set by the data set, not the recipe")
        if key not in accepted and not open_ended:  # open-ended builders are checked when they build
            if difflib.get_close_matches(key, accepted, n=1):  # a typo
                raise _unknown(f"model.{key}", key, ["name", "init_checkpoint", *accepted])
            raise RecipeError(
                f"recipe key 'model.{key}': {model['name']} takes no {key} (its keys: "
                f"{', '.join(['name', 'init_checkpoint', *accepted])}); remove it, for instance when the "
                "recipe was written for another model"
            )


def _hyperflux_method(exact_target: bool) -> str:
    """The method an unset `method` is: hyperflux's, in the form `hyperflux.exact_target` chooses."""
    return "hyperflux" if exact_target else "hyperflux-paper"


def _resolve_method(recipe: dict[str, Any], exact_given: bool) -> None:
    """`method` and `hyperflux.exact_target` agree: each hyperflux method sets it, a contradiction fails;
    the baselines need a target sparsity and schedules inside the budget."""
    hf, spec = recipe["hyperflux"], recipe["baseline"]
    method = recipe["method"]
    if method is None:
        recipe["method"] = _hyperflux_method(hf["exact_target"])
        return
    if method in HYPERFLUX_METHODS:
        exact = method == "hyperflux"
        if exact_given and hf["exact_target"] != exact:
            raise RecipeError(
                f"recipe key 'hyperflux.exact_target': method {method} means exact_target "
                f"{str(exact).lower()}; leave it out of the recipe or set it to match "
                f"(--set hyperflux.exact_target={str(exact).lower()})"
            )
        hf["exact_target"] = exact
        return
    if hf["target_sparsity"] is None:
        raise RecipeError(f"recipe key 'hyperflux.target_sparsity': method {method} needs a target sparsity")
    for key, unset in (("min_density", 0.0), ("overrides", None)):
        if hf[key] != unset:
            raise RecipeError(
                f"recipe key 'hyperflux.{key}': hyperflux's per-layer settings; method {method} prunes its "
                "selection globally without them"
            )
    total = hf["pruning_epochs"] + hf["regrowth_epochs"]
    for key in ("prune_epoch", "start_epoch", "end_epoch", "rewind_epoch"):
        if spec[key] is not None and spec[key] > total:
            raise RecipeError(
                f"recipe key 'baseline.{key}': {spec[key]} is past the budget of {total} epochs "
                "(hyperflux.pruning_epochs + hyperflux.regrowth_epochs)"
            )
    start, end = spec["start_epoch"] or 0, spec["end_epoch"]
    gradual = method in ("gmp", "taylor")  # the methods whose schedule starts at start_epoch
    if (
        gradual
        and end is None
        and start >= (default := phase_end(hf["pruning_epochs"], hf["regrowth_epochs"]))
    ):
        raise RecipeError(
            f"recipe key 'baseline.start_epoch': {start} is not before the schedule's default end, epoch "
            f"{default}; give baseline.end_epoch too"
        )
    if end is not None and end <= start:
        raise RecipeError(f"recipe key 'baseline.end_epoch': must come after start_epoch ({start})")
    if spec["rewind_epoch"] is not None and spec["rewind_epoch"] >= total:
        raise RecipeError(
            f"recipe key 'baseline.rewind_epoch': must come before the end of the budget ({total})"
        )


def _resolve(recipe: dict[str, Any], default_name: str, exact_given: bool) -> dict[str, Any]:
    """Cross-key checks and the defaults that depend on other keys."""
    _resolve_method(recipe, exact_given)
    hf, opt = recipe["hyperflux"], recipe["optimizer"]
    given = [k for k in ("target_sparsity", "pressure", "pressure_schedule") if hf[k] is not None]
    if len(given) != 1:
        raise RecipeError(
            "recipe key 'hyperflux.target_sparsity': give exactly one of hyperflux.target_sparsity, "
            f"hyperflux.pressure, hyperflux.pressure_schedule (got {', '.join(given) or 'none'})"
        )
    if hf["exact_target"] and hf["target_sparsity"] is None:
        raise RecipeError(
            "recipe key 'hyperflux.exact_target': needs hyperflux.target_sparsity; set it false with a "
            "fixed pressure"
        )
    dense = recipe["dense"]
    if dense["epochs"] is None:
        # a recipe saved before dense.lr was left unset there holds the optimiser's lr, which is no choice
        if dense["lr"] not in (None, opt["lr"]) or dense["lr_end"] != 0.0:
            raise RecipeError(
                "recipe key 'dense.lr': a dense run's own lr schedule needs dense.epochs; without it the dense "
                "run follows the pruning run's epochs and lr schedule"
            )
        dense["lr"] = None  # the pruning run's schedule: nothing derived is saved to go stale
    elif dense["lr"] is None:
        dense["lr"] = opt["lr"]
    if recipe["name"] is None:
        recipe["name"] = default_name
    spec = recipe["data"]
    # 224, the default, is in every saved recipe, so only another size is a request this set cannot honour
    if spec["name"] != "imagefolder" and spec["image_size"] != SCHEMA["data"]["image_size"].default:
        raise RecipeError(
            f"recipe key 'data.image_size': image folders only are resized; {spec['name']} is served at its own "
            "size (the -32 sets pad 28x28 images to 32x32)"
        )
    _check_model_args(recipe["model"])
    return recipe


def validate(raw: Any, default_name: str = "run") -> dict[str, Any]:
    """The resolved recipe (every key present) from a raw mapping, or a `RecipeError` naming the key."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"a recipe must be a mapping of keys, got {type(raw).__name__}")
    section = raw.get("hyperflux")
    exact_given = isinstance(section, Mapping) and section.get("exact_target") is not None
    return _resolve(_validate(raw, SCHEMA, "", open_keys=False), default_name, exact_given)


def apply_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """`key.sub=value` assignments (value parsed as YAML) applied to a raw recipe, before validation."""
    raw = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {assignment!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"recipe key '{'.'.join(parts[: depth + 1])}': is not a section")
            node = child
        if isinstance(node.get(parts[-1]), dict) and value is None:
            raise RecipeError(
                f"--set {assignment!r}: recipe key '{key}' is a section, which an empty value would reset to its "
                f"defaults; set its keys ({key}.<key>=value)"
            )
        node[parts[-1]] = value
    keys = {assignment.partition("=")[0] for assignment in assignments}
    # a hyperflux method set here decides exact_target over the file's value, unless exact_target (or the
    # whole section) is set here too, where the two must agree
    section = raw.get("hyperflux")
    chosen = raw.get("method") in HYPERFLUX_METHODS and "method" in keys
    if chosen and isinstance(section, dict) and not keys & {"hyperflux", "hyperflux.exact_target"}:
        section.pop("exact_target", None)
    return raw


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping, which it would let the last win: a
    second `optimizer:` section would silently drop the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} given twice (first on line {seen[key]})")
            if isinstance(key, Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as duplicate:
        raise RecipeError(f"{path}: {duplicate}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise RecipeError(f"{path}:{line} is not valid YAML") from None


def load_recipe(path: str | Path, assignments: Sequence[str] = ()) -> dict[str, Any]:
    """Read, override (`--set`), validate and resolve the recipe at `path`."""
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    return validate(apply_overrides(raw, assignments), default_name=Path(path).stem)


def lr_end(optimizer: Mapping[str, Any]) -> float:
    """The optimiser's final pruning lr: as given, else the authors' ratio (0.1 -> 0.1/30). Derived where it is
    used, not stored, so that a saved recipe given another lr derives it again."""
    return optimizer["lr"] / 30 if optimizer["lr_end"] is None else optimizer["lr_end"]


def saved_form(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved recipe as a run folder saves it: `method`, which validation derives from
    `hyperflux.exact_target`, left unset where it equals that derivation, so that a saved recipe reused with
    another exact_target derives it again instead of contradicting it."""
    saved = copy.deepcopy(dict(recipe))
    if saved["method"] == _hyperflux_method(saved["hyperflux"]["exact_target"]):
        saved["method"] = None
    return saved


def dump(recipe: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=None)


def changes_since(saved: Any, recipe: Mapping[str, Any]) -> list[str]:
    """Dotted keys in which `recipe` differs from the recipe an earlier run saved. The saved one is validated
    again first, so a key the schema gained since then (at its default) is no change; a saved recipe that no
    longer validates is compared as it is."""
    if not isinstance(saved, Mapping):
        return ["the saved recipe (not a mapping)"]
    with contextlib.suppress(RecipeError):
        saved = validate(copy.deepcopy(dict(saved)), default_name=recipe["name"])
    return differences(effective(saved), effective(recipe))


def effective(recipe: Mapping[str, Any]) -> Mapping[str, Any]:
    """`recipe` with the values used for those left to derive: what a run's summary records, and what a resume
    compares (a run saved before lr_end was derived at use holds lr / 30 there)."""
    optimizer = recipe.get("optimizer")
    if not isinstance(optimizer, Mapping) or optimizer.get("lr_end") is not None or "lr" not in optimizer:
        return recipe
    return {**recipe, "optimizer": {**optimizer, "lr_end": lr_end(optimizer)}}


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes."""
    keys = []
    for key in dict.fromkeys([*a, *b]):
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            keys += differences(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(prefix + key)
    return keys

"""Recipe loading: every shipped recipe validates, and each kind of mistake is an error naming its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hyperflux.recipe import (
    RecipeError,
    apply_overrides,
    changes_since,
    dump,
    load_recipe,
    lr_end,
    read_yaml,
    saved_form,
    validate,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"


def minimal(**sections) -> dict:
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "lenet300"},
        "hyperflux": {"target_sparsity": 0.9, "pruning_epochs": 2},
    }
    for key, value in sections.items():
        raw[key] = value if not isinstance(value, dict) else {**raw.get(key, {}), **value}
    return raw


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe["name"]
    assert validate(yaml.safe_load(dump(recipe))) == recipe


def test_shipped_recipes_cover_the_experiments():
    names = {p.stem for p in RECIPES}
    expected = {f"lenet300-mnist-{t}" for t in ("90", "95", "98", "99", "99.5")}
    expected |= {f"{m}-fashion-{t}" for m in ("lenet5", "resnet18") for t in ("90", "95", "98")}
    expected |= {f"{m}-cifar{c}" for m in ("resnet50", "vgg19") for c in ("10", "100")}
    expected |= {f"resnet50-imagenet-{t}" for t in ("90", "95", "96.5")}
    expected |= {"demo", "smoke-digits"}
    assert expected <= names, sorted(expected - names)
    assert any(n.startswith("deit-tiny") for n in names) and any(n.startswith("deit-small") for n in names)


def test_defaults_are_filled_and_dependent_defaults_resolved():
    recipe = validate(minimal(optimizer={"lr": 0.3}), default_name="x")
    assert recipe["name"] == "x"
    assert recipe["optimizer"]["lr_end"] is None and lr_end(recipe["optimizer"]) == pytest.approx(0.01)
    assert recipe["dense"]["lr"] is None  # a dense run follows the pruning run's schedule
    assert validate(minimal(optimizer={"lr": 0.3}, dense={"epochs": 5}))["dense"]["lr"] == 0.3
    assert recipe["hyperflux"]["regrowth_epochs"] == 0
    assert recipe["train"]["label_smoothing"] == 0.1


def test_numbers_written_without_a_dot_are_numbers():
    # PyYAML reads 1e-3 as a string
    recipe = validate(yaml.safe_load(yaml.safe_dump(minimal(optimizer={"lr": "1e-3"}))))
    assert recipe["optimizer"]["lr"] == 0.001


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("optimizer.lr=abc", "recipe key 'optimizer.lr': expected a positive number, got 'abc'"),
        ("optimizer.lr=-1", "recipe key 'optimizer.lr': expected a positive number, got -1"),
        ("optimizer.lrr=0.1", "recipe key 'optimizer.lrr': unknown key (did you mean 'lr'?)"),
        ("optimiser.lr=0.1", "recipe key 'optimiser': unknown key (did you mean 'optimizer'?)"),
        (
            "hyperflux.target_sparsity=98",
            "recipe key 'hyperflux.target_sparsity': expected a fraction in (0, 1)",
        ),
        ("hyperflux.pruning_epochs=2.5", "recipe key 'hyperflux.pruning_epochs': expected an integer >= 1"),
        ("optimizer.name=lion", "recipe key 'optimizer.name': expected one of sgd, adam, adamw, got 'lion'"),
        ("data.name=imagenet2", "recipe key 'data.name': expected one of"),
        ("model.hiden=[8,8]", "recipe key 'model.hiden': unknown key (did you mean 'hidden'?)"),
        ("model.name=lenet5", "recipe key 'model.hidden': lenet5 takes no hidden (its keys: name,"),
        ("model.num_classes=3", "recipe key 'model.num_classes': set by the data set"),
        (
            "hyperflux.modules=[Linear,Dense]",
            "recipe key 'hyperflux.modules': expected torch.nn module names",
        ),
        ("train.label_smoothing=true", "recipe key 'train.label_smoothing': expected a number in [0, 1)"),
        ("train.label_smoothing=1", "recipe key 'train.label_smoothing': expected a number in [0, 1), got 1"),
        ("optimizer.momentum=1", "recipe key 'optimizer.momentum': expected a number in [0, 1), got 1"),
        ("optimizer.betas=[1, 2]", "recipe key 'optimizer.betas': expected a list of two numbers in [0, 1)"),
        (
            "hyperflux.names=''",
            "recipe key 'hyperflux.names': expected a regular expression or a list of them",
        ),
        ("device=gpu", "recipe key 'device': expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("data=3", "recipe key 'data': expected a mapping of keys, got 3"),
        ("hyperflux.pressure=0.5", "give exactly one of hyperflux.target_sparsity, hyperflux.pressure"),
        # values that passed and then overflowed or crashed later, without the key's name
        (
            "hyperflux.init_logit=1e300",
            "recipe key 'hyperflux.init_logit': expected a positive number up to 1000",
        ),
        ("hyperflux.delta=1e300", "recipe key 'hyperflux.delta': expected a positive number up to 100"),
        ("seed=4294967296", "recipe key 'seed': expected an integer in [0, 4294967295]"),
        ("threads=100000", "recipe key 'threads': expected an integer in [1, 1024]"),
        ("name=../elsewhere", "recipe key 'name': expected a name without / or \\"),
        (
            "hyperflux.overrides={fc1: {min_densty: 0.5}}",
            "'fc1' has 'min_densty', which is neither",
        ),
        ("hyperflux.overrides={fc1: {min_density: 5}}", "'fc1': min_density must be a number in [0, 1]"),
        ("optimizer=", "recipe key 'optimizer' is a section, which an empty value would reset"),
        # a size other than the default is ignored by every set but image folders
        ("data.image_size=32", "recipe key 'data.image_size': image folders only are resized; digits is"),
    ],
)
def test_bad_values_name_their_key(assignment, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(SMOKE, [assignment])
    assert message in str(error.value)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML lets the last of two equal keys win: a second `optimizer:` section silently dropped the first
    one's settings."""
    path = tmp_path / "twice.yaml"
    path.write_text(
        "data: {name: digits}\nmodel: {name: lenet300}\noptimizer:\n  name: adam\n  lr: 0.005\n"
        "hyperflux: {target_sparsity: 0.9, pruning_epochs: 2}\noptimizer:\n  weight_decay: 0.0\n"
    )
    with pytest.raises(RecipeError, match=re.escape("line 7: key 'optimizer' given twice (first on line 3)")):
        load_recipe(path)
    path.write_text(path.read_text().replace("optimizer:\n  weight_decay: 0.0\n", "seed: 1\nseed: 2\n"))
    with pytest.raises(RecipeError, match="key 'seed' given twice"):
        load_recipe(path)
    # a merge key brings keys that the mapping may override: not a key given twice
    path.write_text(
        "base: &base {name: adam, lr: 0.005}\ndata: {name: digits}\nmodel: {name: lenet300}\n"
        "optimizer:\n  <<: *base\n  lr: 0.01\nhyperflux: {target_sparsity: 0.9, pruning_epochs: 2}\n"
    )
    assert read_yaml(path)["optimizer"] == {"name": "adam", "lr": 0.01}
    with pytest.raises(RecipeError, match="recipe key 'base': unknown key"):  # read, then refused as a key
        load_recipe(path)


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (
            ["method=gmp", "hyperflux.min_density=0.1"],
            "'hyperflux.min_density': hyperflux's per-layer settings",
        ),
        (["method=rigl", "hyperflux.overrides={fc1: {min_density: 0.5}}"], "'hyperflux.overrides'"),
        (["dense.lr=0.5"], "'dense.lr': a dense run's own lr schedule needs dense.epochs"),
        (["dense.lr_end=0.1"], "'dense.lr': a dense run's own lr schedule needs dense.epochs"),
    ],
)
def test_settings_a_run_would_ignore_are_refused(assignments, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(SMOKE, assignments)
    if assignments[0].startswith("dense"):
        assert load_recipe(SMOKE, ["dense.epochs=3", *assignments])["dense"]["epochs"] == 3


def test_a_saved_recipe_takes_another_optimizer_lr_or_exact_target(tmp_path):
    """A run folder's recipe.yaml holds no value derived from another (dense lr and lr_end from the
    optimiser's lr, method from exact_target), to go stale under --set."""
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump(saved_form(load_recipe(SMOKE, ["optimizer.lr_end=null"]))))
    recipe = load_recipe(saved, ["optimizer.lr=0.3"])
    assert recipe["optimizer"]["lr"] == 0.3 and recipe["dense"]["lr"] is None
    assert recipe["optimizer"]["lr_end"] is None and lr_end(recipe["optimizer"]) == pytest.approx(0.01)
    paper = ["hyperflux.exact_target=false", "hyperflux.target_sparsity=null", "hyperflux.pressure=0.5"]
    assert load_recipe(saved, paper)["method"] == "hyperflux-paper"
    kept = load_recipe(saved, [])  # and unchanged, it resolves to what was saved
    assert kept == load_recipe(SMOKE, ["optimizer.lr_end=null"])
    given = saved_form(load_recipe(SMOKE, ["optimizer.lr=0.3", "optimizer.lr_end=0.01"]))
    assert given["optimizer"]["lr_end"] == 0.01 and given["method"] is None  # 0.3 / 30, but given
    # a run saved when lr_end was stored as lr / 30 resumes under the recipe that derives it
    derived = load_recipe(SMOKE, ["optimizer.lr_end=null"])
    stored = {**derived, "optimizer": {**derived["optimizer"], "lr_end": derived["optimizer"]["lr"] / 30}}
    assert changes_since(stored, derived) == []
    assert changes_since({**stored, "optimizer": {**stored["optimizer"], "lr_end": 1e-4}}, derived) == [
        "optimizer.lr_end"
    ]


def test_required_keys_and_cross_checks():
    with pytest.raises(RecipeError, match=re.escape("recipe key 'data.name': required")):
        validate({"model": {"name": "lenet300"}, "hyperflux": {"target_sparsity": 0.9, "pruning_epochs": 2}})
    raw = minimal()
    raw["hyperflux"] = {"pressure": 0.1, "pruning_epochs": 2}
    with pytest.raises(
        RecipeError, match=re.escape("'hyperflux.exact_target': needs hyperflux.target_sparsity")
    ):
        validate(raw)
    raw["hyperflux"]["exact_target"] = False
    assert validate(raw)["hyperflux"]["pressure"] == 0.1


def test_set_parses_yaml_values_and_creates_sections():
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c=true", "d.e=null", "f=1e-3"])
    assert raw == {"a": {"b": [1, 2], "c": True}, "d": {"e": None}, "f": "1e-3"}
    with pytest.raises(RecipeError, match=re.escape("expected key.sub=value")):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(RecipeError, match=re.escape("recipe key 'a.b': is not a section")):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])


def test_unreadable_files_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(listed)


@pytest.mark.parametrize(
    ("written", "read"), [("off", "off"), ("on", "on"), ("false", "off"), ("auto", "auto")]
)
def test_on_and_off_read_as_words_where_a_key_takes_words(written, read):
    # YAML 1.1 reads a bare `off` as False; keys whose values are words take it back as the word
    assert load_recipe(SMOKE, [f"channels_last={written}"])["channels_last"] == read
    assert load_recipe(SMOKE, ["amp=off"])["amp"] == "off"

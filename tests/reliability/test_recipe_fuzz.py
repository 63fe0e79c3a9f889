"""Property tests: generated malformed recipes end in RecipeError, never another exception.

Values are validated in pydantic's lax mode: "128" for an integer is accepted as 128 (YAML
users quote numbers), so the invalid leaves below are invalid in any mode.
"""

from __future__ import annotations

import copy
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import recipe as R

VALID = {
    "name": "fuzz",
    "model": "smollm2",
    "device": "cpu",
    "seed": 0,
    "data": {
        "source": "wiki",
        "eval_fraction": 0.1,
        "calibration": {"samples": 4, "seq_len": 32},
        "evaluation": {"seq_len": 32, "max_windows": 2},
    },
    "stages": [{"type": "awq"}, {"type": "gptq", "bits": 4, "group_size": 128}],
    "eval": {"perplexity": True, "lm_eval": {"tasks": [], "limit": 2}},
    "export": {"format": "gptq", "output": "outputs/fuzz", "max_shard_size": "2GB"},
}

# Containers (dicts) in VALID a generated error can be put into, as key paths.
CONTAINERS = [(), ("data",), ("data", "calibration"), ("data", "evaluation"), ("stages", 0), ("stages", 1),
              ("eval",), ("eval", "lm_eval"), ("export",)]

# Leaves with values of the wrong type or out of range: each one alone makes a recipe invalid.
INVALID_LEAVES = {
    ("name",): [None, "", "../x", "a/b", ".hidden", 3, ["x"]],
    ("dtype",): ["float8", "fp16", 16, None],
    ("device",): ["gpu", "cuda:x", "", 0],
    ("seed",): ["abc", 1.5, None, [], {}],
    ("batch_size",): [0, -1, "eight", 2.5],
    ("data", "eval_fraction"): [0, 1, -0.5, 2, "half", None],
    ("data", "source"): ["", "a\x00b", "line\nbreak", 5, None],
    ("data", "calibration", "samples"): [0, -3, "many", 1.5, None],
    ("data", "calibration", "seq_len"): [0, 7, "long", None],
    ("data", "evaluation", "max_windows"): [0, -1, "all"],
    ("stages",): [{"type": "rtn"}, "rtn", 3, [3], [None], [[]]],
    ("stages", 0, "type"): ["magic", None, 4, "AWQ"],
    ("stages", 0, "grid"): [0, "x"],
    ("stages", 1, "bits"): [0, 1, 9, 16, "four", 4.5, None],
    ("stages", 1, "group_size"): [0, 1, 4, 12, 100, -2, "big", None],
    ("stages", 1, "damp_percent"): [0, 1, -1, "x"],
    ("stages", 1, "act_order"): ["yes", True, 1],
    ("stages", 1, "symmetric"): ["maybe", [], {}],
    ("eval", "perplexity"): ["sure", [], 2],
    ("eval", "lm_eval", "limit"): [0, "x"],
    ("eval", "lm_eval", "tasks"): ["hellaswag", [1], [None]],
    ("export", "format"): ["gguf", "", None, 1],
    ("export", "output"): ["", "a\x00", 7, []],
    ("export", "max_shard_size"): ["lots", "-1GB", "0MB", "GB", 5],
}

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
key_text = st.text(alphabet=string.ascii_letters + "_-. \n\x00é", min_size=1, max_size=12)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def malformed_recipes(draw) -> dict:
    """A valid recipe with one to three defects, each of which makes it invalid on its own."""
    recipe = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["unknown_key", "bad_leaf", "drop_required", "junk_for_section"]))
        if kind == "unknown_key":
            where = draw(st.sampled_from(CONTAINERS))
            try:
                container = _get(recipe, where)
            except (KeyError, IndexError, TypeError):  # an earlier defect replaced a parent
                continue
            if not isinstance(container, dict):
                continue
            key = draw(key_text.filter(lambda k, c=container, w=where: k not in _known_keys(c, w)))
            container[key] = draw(junk)
        elif kind == "bad_leaf":
            path = draw(st.sampled_from(sorted(INVALID_LEAVES, key=str)))
            try:
                parent = _get(recipe, path[:-1])
                if isinstance(parent, dict) or (isinstance(parent, list) and path[-1] < len(parent)):
                    parent[path[-1]] = draw(st.sampled_from(INVALID_LEAVES[path]))
            except (KeyError, IndexError, TypeError):
                continue
        elif kind == "drop_required":
            recipe.pop("name", None)
        else:
            section = draw(st.sampled_from(["data", "eval", "export"]))
            recipe[section] = draw(junk.filter(lambda v: not isinstance(v, dict) and v is not None))
    if recipe == VALID:  # every defect was skipped: add one that always applies
        recipe["unexpected"] = 1
    return recipe


def _known_keys(container: dict, where: tuple) -> set[str]:
    model = {
        (): R.Recipe, ("data",): R.DataConfig, ("data", "calibration"): R.CalibrationData,
        ("data", "evaluation"): R.EvaluationData, ("stages", 0): R.AWQStage, ("stages", 1): R.GPTQStage,
        ("eval",): R.EvalConfig, ("eval", "lm_eval"): R.LMEvalConfig, ("export",): R.ExportConfig,
    }[where]
    return set(model.model_fields) | set(container)


def test_the_base_recipe_is_valid():
    assert R.parse(copy.deepcopy(VALID)).stages[0].bits == 4


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_recipes())
def test_malformed_recipes_raise_recipe_error(recipe):
    try:
        R.parse(recipe)
    except R.RecipeError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) <= 300
    else:
        raise AssertionError(f"accepted a malformed recipe: {recipe!r}")


@settings(max_examples=300, deadline=None)
@given(junk)
def test_any_structure_is_a_recipe_or_a_recipe_error(data):
    try:
        R.parse(data)
    except R.RecipeError as e:
        assert "\n" not in str(e)


yaml_fragments = st.sampled_from([
    "name: x\n", "stages:\n", "  - type: rtn\n", "    bits: 4\n", "[", "]", "{", "}", "&a ", "*a ", "!!set ",
    "!!python/object:os.system ", "!!binary ", "2020-13-45", "? ", ": ", "- ", "\t", "'", '"', "%YAML 1.1\n",
    "---\n", "...\n", "\x00", "\ufeff", "é", "\\u", "#", "|\n", ">\n", "!!float ", "!!int ", "1e999", ".nan",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(yaml_fragments, max_size=12).map("".join), st.text(max_size=80)))
def test_yaml_text_is_a_recipe_or_a_recipe_error(text):
    try:
        R.parse_yaml(text, "fuzz.yaml")
    except R.RecipeError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_recipe_files_of_random_bytes(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    try:
        R.load(path)
    except R.RecipeError as e:
        assert "\n" not in str(e)

"""docs/config.md is the generated config reference, in sync with the dataclasses."""

import dataclasses
import os
import re

from jaxllm import config_docs
from jaxllm.config import Config, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        nested = isinstance(value, dict) and f"{prefix}{name}" != "mesh.rules"
        if nested and value and name != "fields":
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_committed_reference_matches_the_dataclasses():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_docs.render(), (
        f"docs/config.md is out of date with jaxllm/config.py; run: {config_docs.REGENERATE}"
    )


def test_every_key_has_a_row_with_its_default_and_a_description():
    text = config_docs.render()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if "| `" in line}
    keys = _leaf_keys(to_dict(Config()))
    assert len(keys) > 100
    for key in keys:
        assert key in rows, f"{key} has no row"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[key])[1:-1]]  # not \|
        assert cells[2].startswith("`") and cells[4], f"{key}: no default or description"
    assert '| `"gpt2"` | `gpt2`, `llama` |' in rows["model.flavour"]  # default, choices
    assert "| `-1` |" in rows["mesh.data"]


def test_comments_come_from_the_source():
    @dataclasses.dataclass
    class Example:
        # Two lines of comment
        # above the field.
        a: int = 1  # and one beside it
        b: str = "x"

    comments = config_docs.field_comments(Example)
    assert comments == {"a": "Two lines of comment above the field. and one beside it", "b": ""}

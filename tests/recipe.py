"""The recipe the unit and pipeline tests were written against: single weights by magnitude at
50%, the default heal, served in float. The shipped params.yaml carries the frontier's recipe
(structure, healed through int8, served as int8); the tests of that recipe run the shipped file
as is (test_config, test_pipeline_structured, the docs' commands)."""

from __future__ import annotations

TEST_RECIPE = {"prune": {"method": "magnitude", "sparsity": 0.5, "structure": "unstructured"},
               "heal": {"preset": "default"}, "quant": {"mode": "none"}}


def recipe_overrides() -> list[str]:
    """TEST_RECIPE as `--set` overrides over the shipped file. A params file drops the shipped
    heal fields with its heal section; an override cannot drop one, so heal.quant is set back to
    its default."""
    return [f"{section}.{field}={value}" for section, fields in TEST_RECIPE.items()
            for field, value in fields.items()] + ["heal.quant=none"]

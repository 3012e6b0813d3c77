import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generator():
    spec = importlib.util.spec_from_file_location(
        "generate_operators", os.path.join(ROOT, "docs", "generate_operators.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_operators_doc_is_up_to_date():
    gen = _generator()
    with open(gen.PATH) as f:
        committed = f.read()
    assert committed == gen.render(), "docs/operators.md is stale: run python docs/generate_operators.py"


def test_operators_doc_lists_every_primitive():
    gen = _generator()
    text = gen.render()
    for name in gen._primitives():
        assert f"`{name}`" in text, name

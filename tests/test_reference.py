"""flow_mismatch.py reads like the paper: the method part (above "End of the method") uses no name
defined only below it, runs alone in a fresh module, the contents block names the sections, and
every function fits on a screen."""

import ast
import builtins
import re
import symtable
import sys
import types

import torch

import flow_mismatch as fm
from conftest import ROOT

TEXT = (ROOT / "flow_mismatch.py").read_text()
METHOD = TEXT[:TEXT.index("# End of the method")]


def scopes(table):
    yield table
    for child in table.get_children():
        yield from scopes(child)


def test_the_method_part_uses_only_names_defined_above_the_ruler():
    """For every scope above the ruler (module, classes, functions, lambdas), the global names it reads
    (symtable) are defined above (assigned, imported, def or class at module level) or builtins."""
    top = symtable.symtable(METHOD, "method part", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used = {}
    for scope in scopes(top):
        for s in scope.get_symbols():
            if s.is_referenced() and (s.is_global() or scope is top):
                used.setdefault(s.get_name(), scope.get_name())
    below = {s.get_name() for s in symtable.symtable(TEXT, "file", "exec").get_symbols() if s.is_assigned()}
    missing = {n: where for n, where in used.items() if n not in defined and not hasattr(builtins, n)}
    assert not missing, f"read above the ruler, not defined there: {missing}"
    assert {"mismatch_heat", "mismatch_heat_naive", "MethodConfig"} <= defined
    assert {"Compiled", "forward_batch", "autocast", "ScoreConfig", "TrainConfig"} & defined == set()
    assert {"Compiled", "ScoreConfig", "chunks"} <= below  # the analysis sees the whole file's definitions too


def test_the_method_part_runs_alone(monkeypatch):
    """Executed on its own in a fresh module, the text above the ruler trains a step of Eq. (1) and
    scores: its batched H equals its one-path-at-a-time definition and the full file's H bit for bit."""
    alone = types.ModuleType("method_alone")  # dataclasses look their module up by name
    monkeypatch.setitem(sys.modules, "method_alone", alone)
    exec(compile(METHOD, "method part", "exec"), alone.__dict__)
    ns = alone.__dict__
    assert "Compiled" not in ns and "ScoreConfig" not in ns  # machinery lives below the ruler
    torch.manual_seed(0)
    model = ns["build_model"]("tiny").eval()
    for p in model.parameters():
        if not p.any():  # undo the zero initialisations: a non-trivial velocity
            torch.nn.init.normal_(p, std=0.02)
    y = torch.randn(2, 3, 8, 8)
    assert ns["cfm_loss"](model, y, generator=torch.Generator().manual_seed(0)) > 0
    for aggregator in ("min", "mean", "quantile:0.5"):
        cfg = ns["MethodConfig"](K=3, T=3, aggregator=aggregator)
        heat = ns["mismatch_heat"](model, y, cfg=cfg, batch=5)  # forwards cut across paths
        assert heat.shape == (2, 8, 8) and heat.min() > 0
        assert torch.allclose(heat, ns["mismatch_heat_naive"](model, y, cfg=cfg), rtol=1e-5, atol=1e-7)
        run = fm.ScoreConfig(K=3, T=3, aggregator=aggregator, max_batch=5)
        assert torch.equal(heat, fm.run_mismatch_heat(model, y, None, run))
    for rule in ns["IMAGE_SCORES"]:
        assert torch.equal(ns["image_score"](heat, rule), fm.image_score(heat, rule))


def test_the_contents_block_names_exactly_the_sections():
    """The section titles (the comment line after each ruler, up to ':', '(' or '.') are, in order, the
    names the module docstring's contents block lists (a name ends at two spaces or the line's end)."""
    contents = fm.__doc__[fm.__doc__.index("Contents"):]
    names = [m.group(1) for m in re.finditer(r"^    (\S.*?)(?:  |$)", contents, re.M)]
    titles = [m.group(1).strip() for m in re.finditer(r"^# -{20,}\n# ([^:(.\n]+)", TEXT, re.M)]
    titles.remove("End of the method")
    assert names == titles
    assert len(titles) >= 20 and titles.index("Scorer") < titles.index("Scorer machinery")


def test_every_function_fits_on_a_screen():
    """No function or method of flow_mismatch.py, decorators and docstring included, is over 60 lines."""
    lengths = {f"{n.name} (line {n.lineno})": n.end_lineno - min([n.lineno, *(d.lineno for d in n.decorator_list)]) + 1
               for n in ast.walk(ast.parse(TEXT)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: n for name, n in lengths.items() if n > 60} == {}

"""Pass contracts: a pipeline that cannot give a correct figure is refused in one line, naming
the pass it lacks; passes that break their contract are named."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from hetmap.common.errors import HetmapError, MissingDataError, PassError, PipelineError
from hetmap.compiler.api import compile_model
from hetmap.compiler.ir.annotations import Placement
from hetmap.compiler.ir.hwannotations import AllocationSummary, CostSummary, Tiling
from hetmap.compiler.passes.base import PassResult
from hetmap.compiler.registry import load_registries

ROOT = Path(__file__).resolve().parents[1]
MODEL = "olmoe-tiny"


@pytest.mark.parametrize(("pipeline", "message"), [
    ("place{policy=random},cost", "cost needs Density, which density provides: add density before cost"),
    ("density,place{policy=random},cost", "cost needs Tiling, which tile provides"),
    ("density,place{policy=random},tile,cost", "cost needs AllocationSummary, which allocate provides"),
    ("tile,place{policy=random}", "tile needs Placement, which place provides"),
    ("cost", "cost needs Placement"),
    ("density,place{policy=random},tile,allocate,tile,cost",
     "cost needs AllocationSummary, but tile ran after allocate and made it stale: run allocate "
     "again after tile"),
    ("density,place{policy=random},tile,allocate,place{policy=none},cost",
     "cost needs Tiling, but place ran after tile and made it stale"),
])
def test_pipelines_that_cannot_give_a_correct_figure_are_refused(pipeline: str, message: str) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_model(MODEL, pipeline=pipeline)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_refusal_comes_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import hetmap.compiler.api as api

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was imported before the pipeline was checked")

    monkeypatch.setattr(api, "import_model", fail)
    with pytest.raises(PipelineError, match="cost needs"):
        compile_model(MODEL, pipeline="density,cost")


def test_full_pipeline_prices_every_analog_matrix() -> None:
    plan = compile_model(MODEL, policy="random", budget=0.25)
    cost = plan.graph.get(CostSummary)
    allocation = plan.graph.get(AllocationSummary)
    assert cost is not None and allocation is not None
    analog = [n for n in plan.graph.matrix_nodes() if n.get(Placement) and n.get(Placement).analog]
    assert analog and all(n.get(Tiling) is not None for n in analog)
    assert allocation.tiles_used == sum(n.get(Tiling).count for n in analog)
    assert 0 < cost.estimate.mapped.analog_energy_j
    # the cost of the mapping is below all-digital and above zero analog work
    assert cost.estimate.mapped.tile_activations > 0


def test_rerunning_a_pass_chain_makes_it_fresh_again() -> None:
    plan = compile_model(MODEL, pipeline="density,place{policy=random},tile,allocate,tile,allocate,cost")
    assert plan.graph.get(CostSummary) is not None


@dataclass(frozen=True)
class _Sneaky:
    """A plugin pass that writes an annotation it did not declare."""

    name: ClassVar[str] = "sneaky"
    description: ClassVar[str] = "writes Tiling without saying so"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = ()

    def run(self, graph, ctx):  # type: ignore[no-untyped-def]
        from hetmap.common.grid import TileGrid

        node = next(n for n in graph.matrix_nodes())
        node.annotate(Placement("aimc-tile", "sneaky"))
        m = node.matrices
        node.annotate(Tiling(tuple(TileGrid(x.out_features, x.in_features, 8, 8) for x in m)))
        return PassResult(graph, True)


@dataclass(frozen=True)
class _Liar:
    """Declares a graph-level result it never writes."""

    name: ClassVar[str] = "liar"
    description: ClassVar[str] = "promises AllocationSummary"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = (AllocationSummary,)

    def run(self, graph, ctx):  # type: ignore[no-untyped-def]
        return PassResult(graph, False)


@pytest.mark.parametrize(("cls", "message"), [
    (_Sneaky, "pass sneaky from test wrote Placement, Tiling without declaring it"),
    (_Liar, "pass liar from test declares that it provides AllocationSummary but did not write it"),
])
def test_plugin_passes_are_held_to_their_contract(cls: type, message: str) -> None:
    registries = load_registries(plugins=False)
    registries.passes.register(cls.name, cls, origin="test")
    with pytest.raises(PassError) as caught:
        compile_model(MODEL, pipeline=f"density,{cls.name}", registries=registries)
    assert message in str(caught.value)


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path: Path) -> None:
    """A pipeline without density still checks every expert tensor's shape."""
    import torch
    from safetensors.torch import load_file, save_file

    from hetmap.compiler.frontend.loader import load_model

    load_model(MODEL).module.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "experts" in k and "down" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 3, *tensors[key].shape[1:])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(HetmapError) as caught:  # refused as the checkpoint opens
        compile_model(str(tmp_path), pipeline="expert-score,place{policy=max-norm}")
    assert "does not match its config" in str(caught.value)
    assert "down_proj" in str(caught.value) and "model.safetensors" in str(caught.value)
    # a live module whose weights disagree with the IR is refused by expert-score itself
    from hetmap.compiler.ir.graph import Matrix, Node, NodeKind, WeightRef
    from hetmap.compiler.passes.expert_score import load_matrix

    class Store:
        where = {"w": tmp_path / "model.safetensors"}

        def load(self, ref: WeightRef) -> torch.Tensor:
            return torch.zeros(5, 4)

    matrix = Matrix("down", "e.0.down", 4, 4, WeightRef("w", 0))
    with pytest.raises(MissingDataError, match="does not match its config.json"):
        load_matrix(Store(), Node("e.0", NodeKind.EXPERT, matrices=(matrix,)), matrix)


def _hetmap_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # imports for type checking only do not count
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            block.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("hetmap")}


@pytest.mark.parametrize(("package", "forbidden"), [
    ("common", ("hetmap.",)),
    ("runtime", ("hetmap.compiler",)),
    ("targets", ("hetmap.compiler", "hetmap.runtime")),
    ("compiler/ir", ("hetmap.compiler.passes", "hetmap.compiler.backends",
                     "hetmap.compiler.evaluation", "hetmap.compiler.frontend")),
    ("compiler/algorithms", ("hetmap.compiler.passes", "hetmap.compiler.backends",
                             "hetmap.compiler.evaluation")),
])
def test_import_layering(package: str, forbidden: tuple[str, ...]) -> None:
    """The leaf imports nothing of hetmap; runtime and targets never import the compiler."""
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for name in _hetmap_imports(path) if name.startswith(forbidden)]
    assert not offenders, offenders


def test_import_hetmap_exposes_the_api() -> None:
    code = ("import hetmap, inspect\n"
            "for name in ('compile', 'load_plan', 'sweep', 'Plan', 'HetmapError'):\n"
            "    value = getattr(hetmap, name)\n"
            "    assert inspect.getdoc(value), name\n"
            "assert callable(hetmap.Plan.simulate) and callable(hetmap.Plan.emit_onnx)\n"
            "print(hetmap.compile.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "compile_model"


def test_every_module_says_what_it_is_for() -> None:
    missing = []
    for package in ("hetmap", "common", "compiler", "runtime", "targets"):
        for path in sorted((ROOT / package).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if not doc or len(doc.splitlines()[0]) < 10:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, missing


def test_missing_aihwkit_is_one_line_saying_how_to_install_it() -> None:
    code = ("import sys\nsys.modules['aihwkit'] = None\n"
            "from hetmap.compiler.cli import main\nsys.exit(main(['compile', 'olmoe-tiny']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps aihwkit==1.1.0" in lines[0], result.stderr

"""Trace-time values for Python control flow that does not depend on input sizes or data.

torch.fx cannot branch on a traced value or iterate over one. Many model forwards do both on
values that are the same for every input: ``if position_ids.ndim == 3``, ``if
position_ids.shape[0] == 4`` after an ``expand(4, ...)``, ``reshape(*input_ids.shape, n, d)``.
Such a condition or iteration is resolved once, at trace time. Rules:

1. The graph built so far is run on a *symbolic* example input: a fake tensor (no data) whose
   every size is a free symbol (torch's ``ShapeEnv``; each size of the example must be at
   least 2, as torch makes sizes 0 and 1 constants). Each graph node is run once; the
   torch.fx patches are lifted meanwhile, so modules run eagerly, not traced.
2. ``bool(value)`` is resolved when the value is the same for every size of the inputs: a plain
   bool, or a symbolic bool whose expression is the constant true or false by itself (not by
   the size ranges that code run so far assumed). A condition on a size (``if seq_len > 1``)
   or on tensor data is not resolved.
3. ``iter(value)`` / ``len(value)`` are resolved for a sequence (a shape, a tuple): its length
   never depends on sizes; the items stay traced (``shape[i]``, not an example's size).
4. torch's fake kernel of ``_grouped_mm`` (fused experts) takes bfloat16 only: in the symbolic
   run it computes in bfloat16 and casts back (shapes are all that matter there).
5. An MoE block (a leaf the caller names) routes on data, so it cannot run on a symbolic
   input; it runs once on a concrete input of the example's sizes, and when its output is a
   tensor of its input's shape, that output stands for it (its input's sizes, its own dtype).
   Any other output is :class:`NotStatic`.
7. A model whose weights are not loaded (a checkpoint traced on the meta device) runs with
   fake CPU stand-ins of its meta parameters and buffers (no memory; swapped back after each
   run), so that they meet the example input and the CPU tensors the model's code creates.
   Its MoE blocks (rule 5) cannot run on concrete data: they run on meta inputs, and if
   that fails (data-dependent dispatch), their output is taken to have their input's shape
   and dtype, as an MoE block's hidden states do.
6. If running the example specialised a size to a constant, nothing is resolved (the example
   would then prove nothing about other sizes). Whatever is not resolved is
   :class:`NotStatic`, and the caller keeps fx's error and its fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils._python_dispatch import TorchDispatchMode


class NotStatic(Exception):
    """A value that depends on input sizes or data (or cannot be computed at trace time)."""


class StaticValues:
    """Symbolic example values of a graph under construction (rule 1)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, example_inputs: Sequence[Any],
                 routed: frozenset[str] = frozenset()) -> None:
        self.routed = routed  # module targets of MoE blocks (rule 5)
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.interpreter = fx.Interpreter(root, garbage_collect_values=False, graph=graph)
        inputs = [self._symbolic(x) for x in example_inputs]
        self.interpreter.args_iter = iter(inputs)
        self.graph = graph
        self.symbols = {s for x in inputs if isinstance(x, torch.Tensor) for s in _free_symbols(x)}
        self.constant_sizes = any(not isinstance(size, torch.SymInt) for x in inputs
                                  if isinstance(x, torch.Tensor) for size in list(x.shape))

    def _symbolic(self, example: Any) -> Any:
        if not isinstance(example, torch.Tensor):
            return example
        context: StatelessSymbolicContext[Any, Any] = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * example.dim())
        return self.mode.from_tensor(example, symbolic_context=context)

    def value(self, node: fx.Node) -> Any:
        """The symbolic value of ``node``, running the nodes before it that have not run."""
        if self.constant_sizes:
            raise NotStatic("the example input has a size below 2 (a constant to torch)")
        env = self.interpreter.env
        for pending in self.graph.nodes:
            if pending not in env:
                try:
                    with _maybe_revert_all_patches(), torch.no_grad(), \
                            _fake_weights(self.interpreter.module, self.mode):
                        env[pending] = self._run(pending)
                except Exception as exc:  # noqa: BLE001 - the model's own code: any error
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise NotStatic(f"cannot run {pending.name} on a symbolic input: "
                                    f"{type(exc).__name__} {first}") from exc
            if pending is node:
                break
        specialised = [s for s in self.symbols if self.shape_env.replacements.get(s, s).is_number]
        if specialised:
            raise NotStatic(f"running the example fixed input sizes {sorted(map(str, specialised))}")
        return env[node]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "call_module" and node.target in self.routed:
            return self._run_routed(node)
        with self.mode, _GroupedMmInBf16():
            return self.interpreter.run_node(node)

    def _run_routed(self, node: fx.Node) -> Any:
        """Rule 5."""
        args, kwargs = self.interpreter.fetch_args_kwargs_from_env(node)
        fake = args[0] if args else None
        if not isinstance(fake, torch.Tensor) or not fake.is_floating_point():
            raise NotStatic(f"MoE block {node.target} is not called on hidden states first")
        concrete = torch.randn([_hint(size) for size in fake.shape], dtype=fake.dtype,
                               generator=torch.Generator().manual_seed(0))
        # other tensors (masks) as zeros of their example sizes: only shapes matter here
        args, kwargs = fx.node.map_aggregate((args[1:], kwargs), _zeros_like_example)
        module = self.interpreter.fetch_attr(str(node.target))
        if any(p.is_meta or isinstance(p, FakeTensor) for p in module.parameters()):
            return self._run_unloaded(module, fake, args, kwargs)  # rule 7
        output = module(concrete, *args, **kwargs)
        if not isinstance(output, torch.Tensor) or output.shape != concrete.shape:
            raise NotStatic(f"MoE block {node.target} returns more than its hidden states")
        with self.mode:
            return torch.empty_like(fake, dtype=output.dtype)

    def _run_unloaded(self, module: nn.Module, fake: torch.Tensor, args: Any, kwargs: Any
                      ) -> torch.Tensor:
        """Rule 7: an MoE block without weights, on meta inputs; else its input's shape."""
        meta = fx.node.map_aggregate((args, kwargs), lambda v: v.to("meta")
                                     if isinstance(v, torch.Tensor) else v)
        try:
            with _real_weights(module):
                output = module(torch.empty([_hint(s) for s in fake.shape], dtype=fake.dtype,
                                            device="meta"), *meta[0], **meta[1])
            dtype = output.dtype if isinstance(output, torch.Tensor) else fake.dtype
        except Exception:  # noqa: BLE001 - data-dependent dispatch cannot run on meta
            dtype = fake.dtype
        with self.mode:
            return torch.empty_like(fake, dtype=dtype)

    def resolve_bool(self, node: fx.Node) -> bool:
        """Rule 2."""
        value = self.value(node)
        if isinstance(value, torch.Tensor):
            raise NotStatic(f"{node.name} is a tensor (a condition on data)")
        if isinstance(value, torch.SymInt | torch.SymFloat):
            value = value != 0
        if isinstance(value, torch.SymBool):
            expr = value.node.expr
            if expr in (sympy.true, sympy.false):
                return bool(expr)
            raise NotStatic(f"{node.name} depends on input sizes")
        if isinstance(value, bool | int | float | str | tuple | list | dict | type(None)):
            return bool(value)
        raise NotStatic(f"{node.name} is a {type(value).__name__}")

    def length(self, node: fx.Node) -> int:
        """Rule 3: the number of items ``node`` yields."""
        value = self.value(node)
        if not isinstance(value, tuple | list | torch.Size):
            raise NotStatic(f"{node.name} is a {type(value).__name__}, not a sequence")
        return len(value)


class _GroupedMmInBf16(TorchDispatchMode):
    """Rule 4."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
            dtype = args[0].dtype
            return func(args[0].bfloat16(), args[1].bfloat16(), *args[2:], **kwargs).to(dtype)
        return func(*args, **kwargs)


class _swapped:  # noqa: N801 - a context manager used like a function
    """The parameters and buffers of ``root`` for which ``replace`` gives a tensor swapped for
    it; the originals put back on exit."""

    def __init__(self, root: nn.Module,
                 replace: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.root, self.replace = root, replace
        self.swapped: list[tuple[nn.Module, str, str, torch.Tensor]] = []

    def __enter__(self) -> None:
        for module in self.root.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, tensor in list(table.items()):
                    new = None if tensor is None else self.replace(tensor)
                    if new is not None:
                        self.swapped.append((module, kind, name, tensor))
                        table[name] = new

    def __exit__(self, *exc: object) -> None:
        for module, kind, name, tensor in reversed(self.swapped):
            getattr(module, kind)[name] = tensor
        self.swapped.clear()


def _fake_weights(root: nn.Module, mode: FakeTensorMode) -> _swapped:
    """Rule 7: meta parameters and buffers of ``root`` replaced by fake CPU tensors."""
    cpu = torch.device("cpu")
    return _swapped(root, lambda tensor: FakeTensor(mode, tensor, cpu)
                    if tensor.is_meta and not isinstance(tensor, FakeTensor) else None)


def _real_weights(module: nn.Module) -> _swapped:
    """Inside :func:`_fake_weights`: ``module``'s own meta tensors back, for a meta run."""
    return _swapped(module, lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype,
                                                       device="meta")
                    if isinstance(tensor, FakeTensor) and tensor.device.type == "cpu" else None)


def _zeros_like_example(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return torch.zeros([_hint(size) for size in value.shape], dtype=value.dtype)


def _hint(size: Any) -> int:
    """The example's value of a (symbolic) size."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _free_symbols(tensor: torch.Tensor) -> set[sympy.Symbol]:
    sizes: list[Any] = list(tensor.shape)
    return {s for size in sizes if isinstance(size, torch.SymInt)
            for s in size.node.expr.free_symbols}

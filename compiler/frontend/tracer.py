"""MoE-aware torch.fx tracing.

Rules:

1. MoE blocks (see :mod:`.moe`), attention modules, dense MLPs, embeddings and norms are
   leaf modules: the graph shows them as single ``call_module`` nodes.
2. Hugging Face causal LMs are traced through a wrapper with an explicit
   ``forward(input_ids) -> logits``; the mask builders of ``transformers.masking_utils`` are
   autowrapped (data-dependent control flow inside) and the modeling module is added to the
   autowrap search (its forwards are decorated); its classes are not wrapped (a wrapped class
   breaks ``isinstance``).
3. Config objects reaching the graph become ``get_attr`` nodes of the root instead of being
   rebuilt inside the graph (rebuilding silently drops the attention implementation); so do
   other objects fx cannot put in a graph that hold no traced value (e.g. Gemma 4's
   KV-sharing dict: the same object at run time).
4. A module that fx cannot trace and that holds no MoE block becomes an opaque leaf (kept
   whole, whatever its class name), and tracing starts again; its weight matrices still
   become IR nodes. A module that cannot be traced and holds an MoE block (or the model's
   own forward) raises :class:`TraceError` naming its path and a hint.
5. Inside a module that cannot be kept whole (the model's forward, or a module holding an MoE
   block), a condition, iteration or ``len`` whose value is the same for every input size
   (on ranks or constant sizes: ``if position_ids.ndim == 3``, ``reshape(*input_ids.shape,
   ...)``) is resolved on a symbolic example input (see :mod:`.static`); the graph stays valid
   for every input of the example's ranks. Other control flow there is rule 4's error.
6. There too, ``torch.finfo`` / ``torch.iinfo`` of a traced dtype (``torch.finfo(x.dtype).min``
   in T5-style mask code) is resolved on the same example: a tensor's dtype does not depend on
   input sizes or data.
7. An item assignment to a traced tensor (``llm_input_ids[multimodal_mask] = 0``, in the
   embedding step of multimodal models) is an ``operator.setitem`` node of the graph, in the
   order it ran (fx keeps it although nothing reads its result).
"""

from __future__ import annotations

import inspect
import operator
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from hetmap.common.errors import TraceError
from hetmap.compiler.frontend.static import NotStatic, StaticValues

_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)


class CausalLMWrapper(nn.Module):
    """``forward(input_ids) -> logits`` around a Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def is_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    linears = [n for n, c in module.named_children() if isinstance(c, nn.Linear)]
    return bool(_ATTENTION_NAME.search(type(module).__name__)) and len(linears) >= 2


def is_dense_mlp(module: nn.Module) -> bool:
    """A module whose parametrised children are two or more nn.Linear and nothing else."""
    children = list(module.named_children())
    linears = [c for _, c in children if isinstance(c, nn.Linear)]
    others = [c for _, c in children if not isinstance(c, nn.Linear)]
    return (len(linears) >= 2 and all(not any(True for _ in c.parameters()) for c in others)
            and not list(module.parameters(recurse=False)))


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm):
        return True
    params = list(module.parameters(recurse=False))
    return (bool(_NORM_NAME.search(type(module).__name__)) and not list(module.children())
            and all(p.dim() == 1 for p in params))


def is_rotary(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and "inv_freq" in dict(module.named_buffers())


class _SizedProxy(fx.Proxy):
    """A proxy whose ``len()`` the tracer may resolve (rule 5); fx's refuses it always."""

    def __len__(self) -> int:
        tracer = self.tracer
        assert isinstance(tracer, HetmapTracer)
        return tracer.length(self)

    def __getattr__(self, name: str) -> _SizedAttribute:
        return _SizedAttribute(self, name)

    def __setitem__(self, key: Any, value: Any) -> None:
        """Rule 7: ``x[key] = value`` becomes an ``operator.setitem`` node (fx keeps it: it is
        side-effectful), run where the assignment ran."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _SizedAttribute(fx.proxy.Attribute, _SizedProxy):
    """An attribute of a traced value (e.g. ``x.shape``), sized like :class:`_SizedProxy`."""


class HetmapTracer(fx.Tracer):
    """fx tracer keeping MoE blocks, attention, MLPs, norms and embeddings whole."""

    def __init__(self, moe_paths: Iterable[str], autowrap_modules: tuple[Any, ...] = (),
                 autowrap_functions: tuple[Any, ...] = (), opaque: Iterable[str] = (),
                 example_inputs: tuple[Any, ...] | None = None) -> None:
        super().__init__(autowrap_modules=(__import__("math"), *autowrap_modules),
                         autowrap_functions=autowrap_functions)
        self._autowrap_function_ids -= {id(value) for module in autowrap_modules
                                        for value in vars(module).values() if isinstance(value, type)}
        self.moe_paths = set(moe_paths)
        self.opaque = set(opaque)
        self.example_inputs = example_inputs
        self._constants: dict[int, str] = {}
        self._values: StaticValues | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name.removeprefix("model.") if self._wrapped else module_qualified_name
        if name in self.moe_paths or name in self.opaque:
            return True
        if is_attention(m) or is_dense_mlp(m) or is_norm(m) or is_rotary(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    _wrapped = False

    def to_bool(self, obj: fx.Proxy) -> bool:
        values = self._static_values()
        if values is None:
            return super().to_bool(obj)
        try:
            return values.resolve_bool(obj.node)
        except NotStatic as why:
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow ({why})"
            ) from None

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        values = self._static_values()
        if values is None:
            return super().iter(obj)
        return iter([operator.getitem(obj, i) for i in range(self.length(obj))])

    def length(self, obj: fx.Proxy) -> int:
        values = self._static_values()
        try:
            if values is None:
                raise NotStatic("inside a module that can be kept whole")
            return values.length(obj.node)
        except NotStatic as why:
            raise fx.proxy.TraceError(f"Proxy object has no static length ({why})") from None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None
              ) -> fx.Graph:
        """fx's trace, with ``torch.finfo`` / ``torch.iinfo`` taking traced dtypes (rule 6)."""
        real = torch.finfo, torch.iinfo
        torch.finfo, torch.iinfo = self._info(real[0]), self._info(real[1])  # type: ignore[misc]
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.finfo, torch.iinfo = real  # type: ignore[misc]

    def _info(self, info: Any) -> Any:
        def call(dtype: Any = None) -> Any:
            if isinstance(dtype, fx.Proxy):
                dtype = self.static_dtype(dtype)
            return info() if dtype is None else info(dtype)

        return call

    def static_dtype(self, obj: fx.Proxy) -> torch.dtype:
        """Rule 6: the dtype ``obj`` stands for, from the symbolic example."""
        values = self._static_values()
        try:
            if values is None:
                raise NotStatic("inside a module that can be kept whole")
            value = values.value(obj.node)
        except NotStatic as why:
            raise fx.proxy.TraceError(f"a traced dtype has no static value ({why})") from None
        if not isinstance(value, torch.dtype):
            raise fx.proxy.TraceError(f"{obj.node.name} is a {type(value).__name__}, not a dtype")
        return value

    def _static_values(self) -> StaticValues | None:
        """Rule 5: example values, where the module being traced cannot be kept whole."""
        if self.example_inputs is None:
            return None
        innermost = next(reversed(self.module_stack.values()))[0] if self.module_stack else ""
        if self._wrapped:
            innermost = "" if innermost == "model" else innermost.removeprefix("model.")
        if _can_be_opaque(innermost, self.moe_paths, list(self.opaque)):
            return None
        if self._values is None:
            prefix = "model." if self._wrapped else ""
            routed = frozenset(prefix + path for path in self.moe_paths)
            self._values = StaticValues(self.root, self.graph, self.example_inputs, routed)
        return self._values

    def create_arg(self, a: Any) -> Any:
        from transformers import PreTrainedConfig

        if isinstance(a, PreTrainedConfig):
            return self._constant(a, "config")
        try:
            return super().create_arg(a)
        except NotImplementedError:
            if _holds_proxy(a):
                raise
            return self._constant(a, "object")

    def _constant(self, value: Any, kind: str) -> fx.Node:
        """Rule 3: ``value`` held by the root, read by a ``get_attr`` node."""
        name = self._constants.get(id(value))
        if name is None:
            name = f"_hetmap_{kind}_{len(self._constants)}"
            setattr(self.root, name, value)
            self._constants[id(value)] = name
        return self.create_node("get_attr", name, (), {})


def _holds_proxy(value: Any) -> bool:
    """Whether ``value`` (a container or plain object) holds a traced value directly."""
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple | set):
        items = value
    else:
        items = vars(value).values() if hasattr(value, "__dict__") else ()
    return any(isinstance(item, fx.Proxy) for item in items)


def _hf_autowrap(model: nn.Module) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    import transformers.masking_utils as masking

    modules: list[Any] = [masking]
    modeling = sys.modules.get(type(model).__module__)
    if modeling is not None:
        modules.append(modeling)
    for sub in model.modules():
        mod = sys.modules.get(type(sub).__module__)
        if mod is not None and mod not in modules and mod.__name__.startswith("transformers.models"):
            modules.append(mod)
    functions = tuple(f for name, f in vars(masking).items()
                      if inspect.isfunction(f) and name.startswith("create_") and name.endswith("mask"))
    return tuple(modules), functions


#: at most this many modules are made opaque before tracing gives up
MAX_OPAQUE = 256


#: the example input of a Hugging Face causal LM for rule 5: token ids ``EXAMPLE_SHAPE``
#: (sizes of at least 2, see :mod:`.static`)
EXAMPLE_SHAPE = (2, 8)


def trace(model: nn.Module, moe_paths: Iterable[str], example_input: torch.Tensor | None = None
          ) -> tuple[fx.GraphModule, bool, tuple[str, ...]]:
    """Trace ``model``; return the GraphModule, whether it is wrapped as HF causal LM, and the
    paths of the (outermost) modules kept whole because they could not be traced (rule 4).

    ``example_input`` (token ids for a Hugging Face model, default zeros of
    ``EXAMPLE_SHAPE``) resolves static control flow (rule 5); without one, none is resolved.
    In the wrapped form, module paths in the graph carry a leading ``model.``.
    """
    moe_paths = set(moe_paths)
    hf = is_hf_model(model)
    root: nn.Module = CausalLMWrapper(model) if hf else model
    modules, functions = _hf_autowrap(model) if hf else ((), ())
    if example_input is None and hf:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "meta":  # weights not loaded: the symbolic run fakes them on the CPU
            device = torch.device("cpu")
        example_input = torch.zeros(EXAMPLE_SHAPE, dtype=torch.long, device=device)
    examples = None if example_input is None else (example_input,)
    opaque: list[str] = []
    while True:
        tracer = HetmapTracer(moe_paths, modules, functions, opaque, examples)
        tracer._wrapped = hf
        try:
            graph = tracer.trace(root)
            break
        except TraceError:
            raise
        except Exception as exc:  # fx raises many types; find the module being traced
            failing = _innermost_module(exc, model)
            if failing is None or not _can_be_opaque(failing[0], moe_paths, opaque):
                raise _trace_error(exc, failing, model) from exc
            opaque.append(failing[0])
    outermost = tuple(p for p in opaque if not any(p.startswith(q + ".") for q in opaque))
    return fx.GraphModule(tracer.root, graph, type(root).__name__), hf, outermost


def _can_be_opaque(path: str, moe_paths: set[str], opaque: list[str]) -> bool:
    """A module can be kept whole if it is not the root and holds no MoE block."""
    if not path or path in opaque or len(opaque) >= MAX_OPAQUE:
        return False
    return not any(p == path or p.startswith(path + ".") for p in moe_paths)


def _trace_error(exc: BaseException, failing: tuple[str, str] | None, model: nn.Module) -> TraceError:
    where = f"{failing[0] or 'the model' + chr(39) + 's forward'} ({failing[1]})" if failing \
        else type(model).__name__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    holds = " (it holds an MoE block, so it cannot be kept whole)" if failing and failing[0] else ""
    return TraceError(
        f"torch.fx cannot trace {where}{holds}: {first}. Hint: data-dependent Python control "
        "flow breaks symbolic tracing; rewrite the branch with torch.where, or move the MoE "
        "block out of that module")


def _innermost_module(exc: BaseException, model: nn.Module) -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost module being traced when ``exc`` was raised."""
    paths = {id(m): path for path, m in model.named_modules()}
    tb = exc.__traceback__
    found = None
    while tb is not None:
        frame_self = tb.tb_frame.f_locals.get("self")
        if isinstance(frame_self, nn.Module) and id(frame_self) in paths:
            found = (paths[id(frame_self)], type(frame_self).__name__)
        tb = tb.tb_next
    return found

"""Lower a traced torch.fx graph to hetmap's IR.

Rules (one fx node becomes one IR node, except MoE blocks):

1. ``placeholder``/``output`` become ``input``/``output`` nodes; ``get_attr`` constants are
   dropped (they carry no data flow).
2. A leaf module becomes one typed node named by its module path: attention (all its
   nn.Linear as matrices), dense FFN, embedding, norm, linear / lm-head (the nn.Linear whose
   output is the vocabulary), ``opaque`` for any other leaf holding nn.Linear layers (a
   module the tracer kept whole: all its nn.Linear as matrices, placed by the dense rule),
   or ``op`` for anything else (e.g. rotary embeddings).
3. An MoE block expands to a ``router`` node, one ``expert`` node per routed expert
   (``<experts>.<e>``), its ``shared-expert`` and small ``linear`` nodes, the attention and
   norms inside it (by rule 2; a block that is a whole decoder layer), and an ``op`` node
   ``<block>`` (op ``moe-combine``) that stands for the block's output.
4. ``call_function``/``call_method`` become ``op`` nodes named after the fx node.
5. A node's layer is the first integer in its module path.
6. A module called again (a looped layer, shared weights) is lowered at its first call only;
   each further call is an ``op`` node ``<path>#<n>`` (op ``repeat``, module ``<path>``) that
   carries the data flow, so its weights are placed once.
7. A product by a 2-D parameter that the forward reads directly instead of calling its
   module (``F.linear(x, self.proj.weight)``, ``x @ self.fn``, as Mamba's ``dt_proj`` and
   hyper-connections do) becomes a ``linear`` node with that matrix (key: the parameter's
   name; its first use only): the dense rule places it, and the ONNX emitter tags it.
"""

from __future__ import annotations

import re

import torch.fx as fx
from torch import nn

from hetmap.compiler.frontend.moe import MoeBlock, linear_matrices
from hetmap.compiler.frontend.tracer import is_attention, is_dense_mlp, is_norm
from hetmap.compiler.ir.graph import Graph, Matrix, MoeLayer, Node, NodeKind, WeightRef

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


#: functions and methods that multiply by a matrix operand (rule 7)
_PRODUCTS = frozenset({"linear", "matmul", "mm", "__matmul__"})
#: methods that change a tensor's dtype or layout only (looked through by rule 7)
_CASTS = ("to", "float", "half", "bfloat16", "type", "type_as", "contiguous")


def layer_of(path: str) -> int | None:
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def stack_offsets(model: nn.Module, moe_paths: list[str]) -> dict[str, int]:
    """Where each stack of layers holding MoE blocks starts in the model's layer numbering.

    A causal LM has one stack (``model.layers``: offset 0, layers keep their index). An
    encoder-decoder has two (``encoder.block``, ``decoder.block``): the decoder's layers are
    numbered after the encoder's, so every layer number names one layer.
    """
    offsets: dict[str, int] = {}
    start = 0
    for path in moe_paths:
        match = _LAYER.search(path)
        prefix = path[:match.start()] if match else ""
        if not match or prefix in offsets:
            continue
        offsets[prefix] = start
        try:
            start += len(model.get_submodule(prefix))  # type: ignore[arg-type]
        except (AttributeError, TypeError):
            start += int(match.group(1)) + 1
    return offsets


def _router_matrix(router: nn.Module, path: str) -> Matrix:
    weight = router.get_parameter("weight")
    bias = getattr(router, "bias", None)
    return Matrix(role="router", key=path, out_features=int(weight.shape[0]),
                  in_features=int(weight.shape[1]), weight=WeightRef(f"{path}.weight"),
                  bias=WeightRef(f"{path}.bias") if isinstance(bias, nn.Parameter) else None)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Lowering:
    def __init__(self, graph: Graph, model: nn.Module, blocks: dict[str, MoeBlock],
                 vocab_size: int | None) -> None:
        self.graph = graph
        self.model = model
        self.blocks = blocks
        self.vocab_size = vocab_size
        self.produced: dict[fx.Node, str] = {}  # fx node -> IR node carrying its value
        self.direct: set[str] = set()  # parameters already lowered by rule 7
        self.offsets = stack_offsets(model, list(blocks))

    def layer_of(self, path: str) -> int | None:
        """The layer number of ``path``, counted across stacks (:func:`stack_offsets`)."""
        layer = layer_of(path)
        if layer is None:
            return None
        prefix = next((p for p in self.offsets if path.startswith(p + ".")), None)
        return layer + self.offsets[prefix] if prefix is not None else layer

    def inputs(self, fx_node: fx.Node) -> list[str]:
        names: list[str] = []

        def visit(arg: fx.Node) -> fx.Node:
            name = self.produced.get(arg)
            if name is not None and name not in names:
                names.append(name)
            return arg

        fx.node.map_arg((fx_node.args, fx_node.kwargs), visit)
        return names

    def direct_product(self, fx_node: fx.Node, wrapped: bool) -> Matrix | None:
        """Rule 7: the matrix of a product by a 2-D parameter read directly (``F.linear(x, W)``,
        ``x @ W``, ``x @ W.t()``, ``W @ x``), in ``[out, in]`` terms; None otherwise."""
        target = fx_node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if fx_node.op not in ("call_function", "call_method") or name not in _PRODUCTS:
            return None
        operands = list(fx_node.args[:2])
        if name == "linear":
            candidates = [(operands[1] if len(operands) > 1 else None, False)]
        else:
            candidates = [(operands[1] if len(operands) > 1 else None, True),
                          (operands[0] if operands else None, False)]
        for operand, right in candidates:
            transposed = right and name != "linear"
            while isinstance(operand, fx.Node) and operand.op == "call_method" \
                    and operand.target in _CASTS + ("t", "transpose") and operand.args:
                if operand.target in ("t", "transpose"):
                    if not right:
                        break
                    transposed = not transposed
                operand = operand.args[0]
            if not isinstance(operand, fx.Node) or operand.op != "get_attr":
                continue
            path = str(operand.target)
            if wrapped:
                path = path.removeprefix("model.")
            try:
                weight = self.model.get_parameter(path)
            except AttributeError:
                continue
            if weight.dim() != 2 or path in self.direct:
                continue
            self.direct.add(path)
            rows, cols = (int(d) for d in weight.shape)
            out_features, in_features = (cols, rows) if transposed else (rows, cols)
            return Matrix(role=path.rpartition(".")[2], key=path, out_features=out_features,
                          in_features=in_features, weight=WeightRef(path, transposed=transposed))
        return None

    def unique(self, name: str) -> str:
        if name not in self.graph:
            return name
        i = 1
        while f"{name}#{i}" in self.graph:
            i += 1
        return f"{name}#{i}"

    def module_node(self, path: str, module: nn.Module, inputs: list[str]) -> str:
        layer = self.layer_of(path)
        name = self.unique(path)
        if name != path:  # rule 6
            return self.graph.add(Node(name, NodeKind.OP, path, layer=layer, op="repeat"),
                                  inputs).name
        if path in self.blocks:
            return self.moe_block(self.blocks[path], name, inputs)
        if isinstance(module, nn.Embedding):
            node = Node(name, NodeKind.EMBEDDING, path, layer=layer, extra_params=_own_params(module))
        elif isinstance(module, nn.Linear):
            is_head = module.out_features == self.vocab_size or path.endswith("lm_head")
            kind = NodeKind.LM_HEAD if is_head else NodeKind.LINEAR
            node = Node(name, kind, path, linear_matrices(module, path), layer=layer)
        elif is_attention(module):
            node = Node(name, NodeKind.ATTENTION, path, linear_matrices(module, path), layer=layer)
            node.extra_params = _own_params(module) - node.params
        elif is_dense_mlp(module):
            node = Node(name, NodeKind.DENSE_FFN, path, linear_matrices(module, path), layer=layer)
        elif is_norm(module):
            node = Node(name, NodeKind.NORM, path, layer=layer, extra_params=_own_params(module))
        elif any(isinstance(child, nn.Linear) for child in module.modules()):
            node = Node(name, NodeKind.OPAQUE, path, linear_matrices(module, path), layer=layer,
                        op=type(module).__name__)
            node.extra_params = _own_params(module) - node.params
        else:
            node = Node(name, NodeKind.OP, path, layer=layer, op=type(module).__name__,
                        extra_params=_own_params(module))
        self.graph.add(node, inputs)
        return name

    def moe_block(self, block: MoeBlock, name: str, inputs: list[str]) -> str:
        layer = self.layer_of(block.path)
        if layer is None:
            layer = len(self.graph.moe_layers)
        router_module = self.model.get_submodule(block.router)
        self.graph.add(Node(block.router, NodeKind.ROUTER, block.router,
                            (_router_matrix(router_module, block.router),), layer=layer), inputs)
        combined: list[str] = []
        for e, matrices in enumerate(block.expert_matrices):
            expert = Node(f"{block.experts}.{e}", NodeKind.EXPERT, block.experts, matrices,
                          layer=layer, expert=e)
            combined.append(self.graph.add(expert, [*inputs, block.router]).name)
        for path in block.shared:
            module = self.model.get_submodule(path)
            node = Node(path, NodeKind.SHARED_EXPERT, path, linear_matrices(module, path), layer=layer)
            node.extra_params = _own_params(module) - node.params
            combined.append(self.graph.add(node, inputs).name)
        for path in block.other_linears:
            module = self.model.get_submodule(path)
            node = Node(path, NodeKind.LINEAR, path, linear_matrices(module, path), layer=layer)
            combined.append(self.graph.add(node, inputs).name)
        for path in block.dense:
            combined.append(self.module_node(path, self.model.get_submodule(path), inputs))
        self.graph.add(Node(name, NodeKind.OP, block.path, layer=layer, op="moe-combine"), combined)
        self.graph.moe_layers[layer] = MoeLayer(
            layer=layer, block=block.path, router=block.router, experts_module=block.experts,
            layout=block.layout, num_experts=block.num_experts, top_k=block.top_k,
            shared=block.shared, identity_experts=block.identity_experts)
        return name


def lower(gm: fx.GraphModule, model: nn.Module, blocks: dict[str, MoeBlock], *, name: str,
          wrapped: bool, vocab_size: int | None, opaque: tuple[str, ...] = ()) -> Graph:
    """Build the IR graph of ``model`` from its trace ``gm`` (``opaque``: modules the tracer
    kept whole because they could not be traced)."""
    graph = Graph(name)
    graph.opaque_modules = opaque
    graph.params_total = sum(p.numel() for p in model.parameters())
    lowering = _Lowering(graph, model, blocks, vocab_size)
    for fx_node in gm.graph.nodes:
        inputs = lowering.inputs(fx_node)
        if fx_node.op == "placeholder":
            produced = graph.add(Node(lowering.unique(fx_node.name), NodeKind.INPUT), ()).name
        elif fx_node.op == "output":
            produced = graph.add(Node("output", NodeKind.OUTPUT), inputs).name
        elif fx_node.op == "get_attr":
            continue
        elif fx_node.op == "call_module":
            path = str(fx_node.target)
            if wrapped:
                path = path.removeprefix("model.")
            module = model.get_submodule(path)
            produced = lowering.module_node(path, module, inputs)
        else:
            matrix = lowering.direct_product(fx_node, wrapped)
            if matrix is not None:  # rule 7
                module_path = matrix.key.rpartition(".")[0]
                produced = graph.add(Node(lowering.unique(fx_node.name), NodeKind.LINEAR,
                                          module_path or None, (matrix,),
                                          layer=lowering.layer_of(matrix.key)), inputs).name
                lowering.produced[fx_node] = produced
                continue
            target = fx_node.target
            op = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            produced = graph.add(Node(lowering.unique(fx_node.name), NodeKind.OP, op=op), inputs).name
        lowering.produced[fx_node] = produced
    return graph

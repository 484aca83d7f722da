"""Multimodal MoE families through their text model: the language model and LM head of a
``<Family>ForConditionalGeneration``, without its vision (or audio) towers.

Transformers ships several MoE families only as image-text-to-text models (Qwen3-VL-MoE,
GLM-4.5V, ERNIE-4.5-VL, Mistral Large 3, ...): no ``AutoModelForCausalLM`` class reads their
config, although the experts sit in a text model like any other family's. hetmap maps them
as text models:

1. A config with no ``AutoModelForCausalLM`` class but an image-text-to-text (or multimodal
   LM) one is read through :func:`register_text_model`. If that class is itself a causal LM
   (Mistral 4 is filed there), it is registered as the causal LM as it is.
2. Otherwise the full class is built on the meta device (no memory; from the class's
   default config where the given one builds no vision tower) to find its language model
   (the ``language_model`` submodule, or the one ``*TextModel``) and LM head (its output
   embeddings). The text-only class is a subclass of the full class: it builds the full
   model's shell on the meta device, puts a real language model and LM head at their paths
   (``model.language_model``, ``lm_head``) and drops everything else (towers, projectors).
   Checkpoint keys, Hugging Face's key renamings for the model type and tied weights are
   the full model's; the towers' keys are skipped when a checkpoint is read.
3. Its forward is the full class's own (logit soft-capping, position ids and all), which
   on text-only input never reaches a tower: the full model's logits (tests check this
   against the full class with the same weights, family by family).
4. The class is registered with ``AutoModelForCausalLM`` for the config class, so every
   loading path (``from_config``, ``from_pretrained``, device maps) takes it.
5. A full class with no forward of its own (Qwen3-Omni: a thinker that reads and writes
   text, a talker that speaks) is read through its one child that is itself an
   image-text-to-text model (the thinker): its language model and LM head are kept under
   that child (``thinker.model.language_model``, ``thinker.lm_head``), everything else
   (towers, talker, vocoder) is dropped, and the forward is the child's. A family with no
   single language model and LM head is not registered; loading it is one error
   (:func:`unmapped_reason`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: config class -> the text-only class registered for it
_REGISTERED: dict[type, type] = {}


def _mapped(auto: Any, config_class: type) -> type | None:
    mapping = auto._model_mapping
    return mapping[config_class] if config_class in mapping else None  # type: ignore[no-any-return]


def full_class(config: Any) -> type | None:
    """The image-text-to-text (or multimodal LM) class of ``config``, if transformers has one."""
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForMultimodalLM"):
        auto = getattr(transformers, name, None)
        found = _mapped(auto, type(config)) if auto is not None else None
        if found is not None:
            return found
    return None


def register_text_model(config: Any) -> type | None:
    """Rules 1-4 for ``config``'s class: the class ``AutoModelForCausalLM`` now builds for it,
    or None where transformers has a causal LM already or rule 5 applies (not remembered: a
    later, complete config of the class may still be read)."""
    import transformers

    config_class = type(config)
    if config_class in _REGISTERED:
        return _REGISTERED[config_class]
    if _mapped(transformers.AutoModelForCausalLM, config_class) is not None:
        return None
    full = full_class(config)
    if full is None:
        return None
    made = full if _is_causal_lm(full, config) else _text_only_class(full, config)
    if isinstance(made, str):
        return None
    _REGISTERED[config_class] = made
    transformers.AutoModelForCausalLM.register(config_class, made, exist_ok=True)
    return made


def unmapped_reason(config: Any) -> str | None:
    """Rule 5's one line for ``config`` (None where a causal-LM class reads it, or where it is
    not a multimodal family's)."""
    import transformers

    full = full_class(config)
    if full is None or register_text_model(config) is not None or _mapped(
            transformers.AutoModelForCausalLM, type(config)) is not None:
        return None
    why = _structure(full, config)
    assert isinstance(why, str)
    kind = getattr(config, "model_type", type(config).__name__)
    return f"{kind} is a multimodal model and {why}, so hetmap has no text model to map"


def _is_causal_lm(full: type, config: Any) -> bool:
    return full.__name__.endswith("ForCausalLM") and getattr(config, "text_config", None) is None


def _structure(full: type, config: Any) -> tuple[str, type, str, str] | str:
    """Rule 2: (path, class) of the full class's language model, the path of its LM head and
    (rule 5) the child whose forward is the model's ("" for the full class's own), from an
    instance on the meta device; or why there are none."""
    model: nn.Module | None = None
    for candidate in (lambda: config, type(config)):  # the paths do not depend on the sizes
        try:
            with torch.device("meta"):
                model = full(candidate())
            break
        except Exception:  # noqa: BLE001 - e.g. a tiny text model under a full-size tower
            continue
    if model is None:  # the full class cannot be built: not registered (rule 5)
        return f"its {full.__name__} cannot be built from this config"
    if not _has_forward(type(model)):  # rule 5: a thinker (and a talker) without a forward
        thinkers = [(name, child) for name, child in model.named_children()
                    if getattr(child, "config", None) is not None
                    and full_class(child.config) is type(child) and _has_forward(type(child))]
        inner = _language_and_head(thinkers[0][1]) if len(thinkers) == 1 else None
        if inner is None:
            return (f"its {full.__name__} has no forward and no single child model with a "
                    "language model and an LM head")
        name = thinkers[0][0]
        return f"{name}.{inner[0]}", inner[1], f"{name}.{inner[2]}", name
    found = _language_and_head(model)
    if found is None:
        return f"its {full.__name__} has no single language model with an LM head"
    return (*found, "")


def _has_forward(cls: type) -> bool:
    return getattr(cls, "forward", None) is not nn.Module.forward


def _language_and_head(model: nn.Module) -> tuple[str, type, str] | None:
    paths = {id(module): path for path, module in model.named_modules()}
    head = model.get_output_embeddings()  # type: ignore[operator]
    language = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(language, nn.Module):
        texts = [m for m in model.modules() if type(m).__name__.endswith("TextModel")]
        language = texts[0] if len(texts) == 1 else None
    if language is None or head is None or id(head) not in paths:
        return None
    return paths[id(language)], type(language), paths[id(head)]


def _text_only_class(full: type, config: Any) -> type | str:
    """Rules 2-3: the text-only subclass of ``full`` (or why there is none)."""
    structure = _structure(full, config)
    if isinstance(structure, str):
        return structure
    text_path, text_class, head_path, delegate = structure
    kept = (text_path, head_path)

    def __init__(self: Any, config: Any) -> None:
        with torch.device("meta"):  # the full model's shell: no memory
            full.__init__(self, config)  # type: ignore[misc]
        text_config = self.get_submodule(text_path).config  # as the full class made it
        _replace(self, text_path, text_class._from_config(text_config))  # type: ignore[attr-defined]
        head = self.get_submodule(head_path)
        _replace(self, head_path, nn.Linear(head.in_features, head.out_features,
                                            bias=head.bias is not None))
        _drop_towers(self, kept)
        if getattr(text_config, "tie_word_embeddings", False) or getattr(
                config, "tie_word_embeddings", False):
            self.tie_weights()

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(delegate)(*args, **kwargs)  # rule 5: the thinker's

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__doc__": f"{full.__name__} without its towers: text in, logits out (hetmap).",
        "__module__": full.__module__,  # transformers reads the family's module source
        # the towers' tensors in a checkpoint are not read (and not reported)
        "_keys_to_ignore_on_load_unexpected": [
            r"^(?!(" + "|".join(p.replace(".", r"\.") for p in kept) + r")\.)"],
    }
    if delegate:
        namespace["forward"] = forward
    return type(f"{full.__name__}TextOnly", (full,), namespace)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _drop_towers(root: nn.Module, kept: tuple[str, ...]) -> None:
    """Remove every module and tensor of ``root`` that is neither in a ``kept`` path nor on
    the way to one (the vision and audio towers, projectors, their parameters)."""
    def needed(path: str) -> bool:
        return any(k == path or k.startswith(path + ".") or path.startswith(k + ".")
                   for k in kept) or not path

    for path, module in list(root.named_modules()):
        if not needed(path) or any(path.startswith(k + ".") or path == k for k in kept):
            continue  # dropped with its parent, or kept whole
        for name in list(module._modules):
            if not needed(f"{path}.{name}" if path else name):
                module._modules[name] = None
        for name in list(module._parameters):
            module._parameters[name] = None
        for name in list(module._buffers):
            if (buffer := module._buffers[name]) is not None and buffer.is_meta:
                module._buffers[name] = None

"""Resolve a MODEL argument to a loaded model.

MODEL is one of (rules, in order):

1. a trained model that ships with hetmap (``demo``, ``demo-c``, ``demo-ds``);
2. a built-in config name (see ``hetmap models``): tiny ones get random weights from a fixed
   seed, full-size ones are built on the meta device (structure only, no weight memory);
3. a local Hugging Face checkpoint directory (``config.json`` + safetensors), local files only;
4. a factory ``path/to/file.py:function`` or ``package.module:function`` returning an
   ``nn.Module`` or ``(nn.Module, example_input)``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetmap.common.errors import MissingDataError, ModelLoadError, first_line
from hetmap.compiler.data.weights import CheckpointWeights, ModuleWeights, WeightStore
from hetmap.compiler.frontend.builtin import ATTENTION, BUILTIN_MODELS, TINY_SEED, TRAINED_MODELS


@dataclass
class LoadedModel:
    """A model ready for tracing, with what hetmap knows about where it came from."""

    spec: str
    name: str
    source: str  # "builtin", "trained", "checkpoint", "factory" or "module"
    module: nn.Module
    config: Any = None
    tokenizer: Any = None
    checkpoint: Path | None = None
    example_input: torch.Tensor | None = None
    trust_remote_code: bool = False
    #: the dtype weights are loaded, calibrated and simulated in (see :func:`resolve_dtype`)
    dtype: torch.dtype = torch.float32

    @property
    def on_meta(self) -> bool:
        """True when the module holds no weight data (built on the meta device)."""
        return any(p.is_meta for p in self.module.parameters())

    @property
    def has_weights(self) -> bool:
        return not self.on_meta or self.checkpoint is not None

    def runnable(self, device_map: Any = None, offload_folder: Path | None = None) -> nn.Module:
        """The module with real weights (a checkpoint is loaded now, on first use; placed by
        accelerate's ``device_map`` when one is given, see :mod:`hetmap.compiler.data.devices`)."""
        if not self.on_meta:
            return self.module
        if self.checkpoint is None:
            raise MissingDataError(
                f"model {self.name!r} has no weights (built on the meta device for a "
                "structure-only compile); use a tiny built-in config, 'demo' or a checkpoint")
        import transformers

        from hetmap.compiler.data.checkpoint import check_finite
        from hetmap.compiler.frontend.multimodal import register_text_model

        register_text_model(self.config)  # (in this process too: a multimodal family)
        placed = {} if device_map is None else {"device_map": device_map,
                                                "offload_folder": str(offload_folder)}
        try:
            module = transformers.AutoModelForCausalLM.from_pretrained(
                self.checkpoint, local_files_only=True, trust_remote_code=self.trust_remote_code,
                attn_implementation=ATTENTION, dtype=self.dtype, **placed).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the weights of {self.checkpoint}: {first}") from exc
        check_finite(module, self.checkpoint)
        self.module = without_kv_cache(module)
        return self.module

    def weights(self) -> WeightStore:
        """Weight access without instantiating anything new (streams from a checkpoint)."""
        if self.checkpoint is not None and self.on_meta:
            return CheckpointWeights(self.checkpoint)
        if self.on_meta:
            raise MissingDataError(
                f"model {self.name!r} has no weights (meta device); use a tiny built-in config, "
                "'demo' or a checkpoint, or a weight-free policy (none, all, random)")
        return ModuleWeights(self.module)

    @property
    def vocab_size(self) -> int | None:
        size = getattr(self.config, "vocab_size", None)
        if isinstance(size, int):
            return size
        embedding = next((m for m in self.module.modules() if isinstance(m, nn.Embedding)), None)
        return embedding.num_embeddings if embedding is not None else None


def without_kv_cache(model: nn.Module) -> nn.Module:
    """``model`` with every config it holds set to ``use_cache=False``: hetmap runs whole
    windows and never generates, so no forward should build a KV cache (memory for nothing;
    and a recorded call that holds one extends it when replayed). Some forwards (Qwen3-VL's)
    take no ``use_cache`` argument to refuse it with."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return model


def _from_config(config: Any, meta: bool) -> nn.Module:
    import transformers

    from hetmap.compiler.frontend.multimodal import register_text_model

    register_text_model(config)
    context = torch.device("meta") if meta else contextlib.nullcontext()
    if not meta:
        torch.manual_seed(TINY_SEED)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    with context:
        model = without_kv_cache(auto.from_config(config, attn_implementation=ATTENTION))
    return (as_next_token_model(model) if seq2seq else model).eval()


def as_next_token_model(model: nn.Module) -> nn.Module:
    """Make a Hugging Face encoder-decoder callable as ``model(input_ids)`` like a causal LM.

    The encoder reads the window and the decoder reads the same window, so ``logits[:, t]``
    predicts token ``t + 1`` with the whole window in view: a reconstruction objective. Its
    perplexity compares a mapped model with its digital self (hetmap's accuracy measure); it
    is not a language-model perplexity. The instance's ``forward`` is replaced (the class is
    untouched), so module paths, tracing and every eager call see the same model.
    """
    class_forward = type(model).forward

    def forward(self: nn.Module, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = input_ids
        for mask, ids in (("attention_mask", input_ids),
                          ("decoder_attention_mask", kwargs.get("decoder_input_ids"))):
            if kwargs.get(mask) is None and ids is not None:
                # the default all-ones mask, built from the ids so that tracing needs no shapes
                kwargs[mask] = torch.ones_like(ids)
        return class_forward(self, input_ids=input_ids, **kwargs)

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model


def _persistent_buffers_to_meta(model: nn.Module) -> None:
    """Buffers the checkpoint stores (DeepSeek-V3's ``e_score_correction_bias``) go to the meta
    device like the parameters, so that every reader takes them from the checkpoint, never
    from the model's initialisation; non-persistent ones (in no file) keep their init value."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to("meta")


def _load_checkpoint(path: Path, spec: str, trust_remote_code: bool, source: str) -> LoadedModel:
    import transformers

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint (no config.json); "
                             "pass a directory written by save_pretrained")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has no weight files (*.safetensors); "
                             "pass a directory written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code)
        from accelerate import init_empty_weights

        from hetmap.compiler.frontend.multimodal import unmapped_reason

        reason = unmapped_reason(config)  # a multimodal family: registers its text-only class
        if reason is not None:
            raise ModelLoadError(f"cannot load checkpoint {path}: {reason}")

        # parameters on the meta device; non-persistent buffers real (Gemma 4's embed_scale
        # is in no checkpoint file, only in the model's own init)
        with init_empty_weights(include_buffers=False):
            try:
                model = transformers.AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code, attn_implementation=ATTENTION)
            except (TypeError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
                # a config.json its own model class cannot be built from (fields missing)
                raise ModelLoadError(
                    f"cannot load checkpoint {path}: its config.json does not build its model "
                    f"({type(exc).__name__}: {first_line(exc)})") from exc
        model.tie_weights()  # the context made each parameter anew: tied ones again one tensor
        without_kv_cache(model)
        _persistent_buffers_to_meta(model)
    except ValueError as exc:
        hint = "" if trust_remote_code else " (if it ships its own modeling code, add --trust-remote-code)"
        raise ModelLoadError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}{hint}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    from hetmap.compiler.data.checkpoint import check_files

    check_files(path, {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()})
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        with contextlib.suppress(Exception):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(spec=spec, name=spec if source == "trained" else path.name, source=source,
                       module=model.eval(), config=config, tokenizer=tokenizer, checkpoint=path,
                       trust_remote_code=trust_remote_code)


def _load_factory(spec: str) -> LoadedModel:
    target, _, func_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise ModelLoadError(f"factory file {file} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"hetmap_factory_{file.stem}", file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelLoadError:
        raise
    except Exception as exc:  # user code: any import failure is reported in one line
        raise ModelLoadError(f"cannot import factory module {target!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelLoadError(f"{target!r} has no callable {func_name!r}; "
                             "a factory is 'file.py:function' returning an nn.Module")
    try:
        result = factory()
    except Exception as exc:
        raise ModelLoadError(f"factory {spec} raised {type(exc).__name__}: {exc}") from exc
    example = None
    if isinstance(result, tuple) and len(result) == 2:
        result, example = result
    if not isinstance(result, nn.Module):
        raise ModelLoadError(f"factory {spec} returned {type(result).__name__}, not an nn.Module")
    return LoadedModel(spec=spec, name=func_name, source="factory", module=result.eval(),
                       config=getattr(result, "config", None), example_input=example)


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def resolve_dtype(requested: str, config: Any) -> torch.dtype:
    """``requested`` ("auto", "float32", "bfloat16", "float16") as a torch dtype; "auto" is
    the checkpoint's own dtype when it is a reduced one (its config's ``dtype``), else
    float32."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelLoadError(f"unknown dtype {requested!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    # (transformers reads a config's old ``torch_dtype`` into ``dtype``; asking a config for
    # ``torch_dtype`` only prints a deprecation warning)
    stored = getattr(config, "dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return DTYPES[name] if name in ("bfloat16", "float16") else torch.float32


def load_model(spec: str, *, trust_remote_code: bool = False, dtype: str = "auto") -> LoadedModel:
    """Resolve ``spec`` (see module docstring) and set its dtype (:func:`resolve_dtype`);
    raise :class:`ModelLoadError` on failure."""
    loaded = _load_model(spec, trust_remote_code=trust_remote_code)
    loaded.dtype = resolve_dtype(dtype, loaded.config)
    if loaded.dtype != torch.float32 and not loaded.on_meta:
        loaded.module = loaded.module.to(loaded.dtype)
    return loaded


def _load_model(spec: str, *, trust_remote_code: bool = False) -> LoadedModel:
    if spec in TRAINED_MODELS:
        directory = TRAINED_MODELS[spec][0]
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"the {spec} weights are missing from {directory}; "
                                 "run examples/train_demo.py to recreate them")
        return _load_checkpoint(directory, spec, False, "trained")
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        config = builtin.make_config()
        module = _from_config(config, meta=builtin.full_size)
        return LoadedModel(spec=spec, name=spec, source="builtin", module=module, config=config)
    if spec.startswith("tiny:"):  # a tiny config of an MoE family of transformers (zoo.py)
        from hetmap.compiler.frontend.zoo import ZOO

        family = ZOO.get(spec.removeprefix("tiny:"))
        if family is None:
            why = "not a tiny family"
            known = ", ".join(list(ZOO)[:6])
            raise ModelLoadError(f"{spec!r} is {why}; tiny families: {known}, ... "
                                 "(see 'hetmap models')")
        config = family.make_config()
        module = family.initialize(_from_config(config, meta=False))
        return LoadedModel(spec=spec, name=spec, source="builtin", module=module, config=config)
    path = Path(spec)
    if path.is_dir():
        return _load_checkpoint(path, spec, trust_remote_code, "checkpoint")
    if ":" in spec and not path.exists():
        return _load_factory(spec)
    if path.exists():
        raise ModelLoadError(f"{spec} is a file, not a checkpoint directory; for a factory "
                             f"write '{spec}:function'")
    known = ", ".join([*TRAINED_MODELS, *BUILTIN_MODELS])
    raise ModelLoadError(f"unknown model {spec!r}: not a built-in name ({known}), "
                         "a checkpoint directory, or a factory 'file.py:function'")

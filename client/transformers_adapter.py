"""Every transformers internal the client calls, in one place, called by keyword.

``weightd.client.hf`` builds a module the way ``from_pretrained`` does, with transformers' own
pieces; several of them are private (a leading underscore, or a module transformers does not
document). They are all here, each behind a function named for what it does, so that a
transformers release that moves one breaks this file only, and the versions it was tested
against are declared in pyproject.toml (``[tool.weightd] transformers-tested``). The daemon
calls no transformers internal: its loader process uses ``from_pretrained`` and ``from_config``.

Imported only when an HF model is attached (torch and transformers are loaded by then).
"""

from __future__ import annotations

import contextlib
import inspect

import transformers
from transformers import modeling_utils
from transformers.core_model_loading import rename_source_key
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class
from transformers.utils.generic import ContextManagers
from transformers.utils.loading_report import LoadStateDictInfo


def is_auto_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass)


def concrete_class(auto_cls, config):
    """The class ``auto_cls.from_pretrained`` would build for ``config``."""
    return _get_model_class(config, auto_cls._model_mapping)


def dtype_for(config, tensors: dict):
    """``from_pretrained``'s ``dtype="auto"`` rule: the config's dtype, else the first floating
    tensor's. Returns ``(config, dtype)``."""
    return modeling_utils._get_dtype(
        dtype="auto",
        checkpoint_files=None,
        config=config,
        sharded_metadata=None,
        state_dict=tensors,
        weights_only=True,
        hf_quantizer=None,
    )


@contextlib.contextmanager
def init_context(cls, dtype, config):
    """The context ``from_pretrained`` creates a model in: meta device, dtype, no ties yet."""
    extra = (
        {"config": config} if "config" in inspect.signature(cls.get_init_context).parameters else {}
    )  # 5.25+
    contexts = cls.get_init_context(
        dtype=dtype, is_quantized=False, _is_ds_init_called=False, allow_all_kernels=None, **extra
    )
    with ContextManagers(contexts):
        yield


def patch_outputs(module) -> None:
    """Output recorders as ``from_pretrained`` patches them (absent in some releases)."""
    with contextlib.suppress(ImportError, AttributeError):
        from transformers.monkey_patching import patch_output_recorders

        patch_output_recorders(module)


def loading_info(missing: set[str]) -> LoadStateDictInfo:
    """An empty loading report with ``missing`` keys, as the loading loop starts one."""
    return LoadStateDictInfo(
        missing_keys=set(missing),
        unexpected_keys=set(),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )


def renamed_key(key: str, prefix: str | None, expected: dict) -> str:
    """``key`` as from_pretrained's prefix rule places it (a base model's weights into a model
    with a head, and back)."""
    return rename_source_key(
        source_key=key,
        weight_renamings=[],
        weight_converters=[],
        base_model_prefix=prefix,
        meta_state_dict=expected,
    )[0]


def finish(cls, module, *, source: str | None, dtype, info: LoadStateDictInfo) -> None:
    """from_pretrained's own finishing: non-persistent buffers off meta and computed, missing
    keys initialized by the class's rules, ties, the report of ignored and initialized keys."""
    load_config = modeling_utils.LoadStateDictConfig(
        pretrained_model_name_or_path=source,
        dtype=dtype,
        dtype_plan=module._get_dtype_plan(dtype),
    )
    cls._finalize_model_loading(module, load_config, info)


def adjust_generation(module, folder: str) -> None:
    """The generation config's adjustments ``from_pretrained`` makes for a generative model."""
    if module.can_generate() and hasattr(module, "adjust_generation_fn"):
        module.adjust_generation_fn(
            generation_config=None,
            from_auto_class=False,
            from_pipeline=None,
            pretrained_model_name_or_path=folder,
            cache_dir=None,
            force_download=False,
            proxies=None,
            local_files_only=True,
            token=None,
            revision=None,
            subfolder="",
            trust_remote_code=False,
        )


def version() -> str:
    return transformers.__version__

"""lowrank: low-rank adaptation and low-rank training under one roof.

    import lowrank
    lowrank.adapt(model, "dora", rank=16)          # inject, freeze the rest
    lowrank.save_adapter(model, "out/")              # PEFT-compatible where PEFT has the method
"""

from .core.adapter import Adapter, FactorAdapter
from .core.api import (
    active_adapters,
    adapt,
    adapter_record,
    aux_loss,
    count_parameters,
    delete_adapter,
    disabled,
    merge,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.init import Init
from .core.inject import adapted_layers, adapter_names, resolve_targets
from .core.io import adapter_config, adapter_state, load_adapter, save_adapter
from .core.layers import AdaptedLayer, BaseLayer
from .errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    AlreadyAdaptedError,
    CalibrationError,
    ConfigError,
    LowRankError,
    MergeError,
    ShapeError,
    TargetError,
    UnknownNameError,
    UnsafePathError,
    UnsupportedLayerError,
)
from .registry import MethodInfo, get_init, get_method, inits, method_info, methods, register_init, register_method

__version__ = "0.1.0"

__all__ = [
    # adapting
    "adapt",
    "merge",
    "unmerge",
    "disabled",
    "unload",
    "set_active",
    "delete_adapter",
    "active_adapters",
    "adapter_names",
    "adapted_layers",
    "adapter_record",
    "resolve_targets",
    "trainable_parameters",
    "count_parameters",
    "aux_loss",
    # files
    "save_adapter",
    "load_adapter",
    "adapter_state",
    "adapter_config",
    # registry
    "methods",
    "inits",
    "method_info",
    "MethodInfo",
    "get_method",
    "get_init",
    "register_method",
    "register_init",
    # protocol
    "Adapter",
    "FactorAdapter",
    "Init",
    "AdaptedLayer",
    "BaseLayer",
    # errors
    "LowRankError",
    "UnknownNameError",
    "TargetError",
    "UnsupportedLayerError",
    "ShapeError",
    "AlreadyAdaptedError",
    "AdapterNotFoundError",
    "MergeError",
    "AdapterLoadError",
    "UnsafePathError",
    "CalibrationError",
    "ConfigError",
]

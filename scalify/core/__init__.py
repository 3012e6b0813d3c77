"""scalify's core: ScaledArray, power-of-two helpers, config, rule registry, the jaxpr
walker and the interpreter."""
from scalify.core.config import Pow2RoundMode, ScalifyConfig, get_config
from scalify.core.datatype import (
    ScaledArray,
    as_scaled_array,
    asarray,
    is_float_dtype,
    is_scaled_leaf,
    scaled_array,
)
from scalify.core.interpreter import eval_closed_jaxpr, eval_jaxpr, scalify
from scalify.core.pow2 import (
    get_mantissa,
    is_pow2,
    is_static,
    pow2_round,
    pow2_round_down,
    pow2_round_stochastic,
    pow2_round_up,
)
from scalify.core.registry import (
    UnsupportedPrimitiveError,
    get_scaled_rule,
    register_argument_check,
    register_scaled_op,
    register_static_impl,
    get_static_impl,
    registered_primitives,
)

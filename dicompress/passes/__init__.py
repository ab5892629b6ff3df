"""Built-in passes. Each module registers its pass on import; this list is the whole set."""
from .base import PASSES, Pass, PassConfig, get_pass, register_pass
from . import act_quant, ars, rtn, smooth, tlq  # noqa: E402,F401  (register on import)
from . import depth_analysis  # noqa: F401  (register on import)
from . import amber_depth, distill, hybrid_stream, ppcl_depth  # noqa: E402,F401  (register on import)
from . import width_prune  # noqa: E402,F401  (register on import)
from . import mask_prune  # noqa: E402,F401  (register on import)
from . import ppcl_width  # noqa: E402,F401  (register on import)
from . import dense2moe  # noqa: E402,F401  (register on import)
from . import clear  # noqa: E402,F401  (register on import)
from . import mob  # noqa: E402,F401  (register on import)
from . import lrq_auto  # noqa: E402,F401  (register on import)
from .act_quant import ActQuant  # noqa: E402
from .ars import ARS  # noqa: E402
from .rtn import RTN  # noqa: E402
from .smooth import Smooth  # noqa: E402
from .tlq import TLQ  # noqa: E402

__all__ = ["PASSES", "Pass", "PassConfig", "get_pass", "register_pass", "ActQuant", "ARS", "RTN", "Smooth", "TLQ"]

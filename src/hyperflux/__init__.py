"""hyperflux: learned unstructured sparsity for any PyTorch model.

`Hyperflux` attaches per-weight L0 masks driven by flux against a scheduled global pressure;
`PressureScheduler` owns that pressure.
"""

from hyperflux.scheduler import PressureScheduler
from hyperflux.sparsifier import Hyperflux

__all__ = ["Hyperflux", "PressureScheduler", "__version__"]
__version__ = "0.1.0"

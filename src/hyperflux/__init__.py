"""hyperflux: learned unstructured sparsity for any PyTorch model.

`Hyperflux` attaches per-weight L0 masks driven by flux against a scheduled global pressure;
`PressureScheduler` owns that pressure. `save_sparse`/`load_sparse` store a pruned model compactly and
`to_sparse_inference` runs it with sparse kernels where those are faster; `count_macs` says how much
arithmetic the present weights cost; `flush_denormals` keeps pruned weights' decaying optimiser moments from
slowing a CPU run.
"""

from hyperflux.export import load_sparse, save_sparse
from hyperflux.kernels import flush_denormals
from hyperflux.macs import count_macs
from hyperflux.scheduler import PressureScheduler
from hyperflux.sparse_inference import to_sparse_inference
from hyperflux.sparsifier import Hyperflux

__all__ = [
    "Hyperflux",
    "PressureScheduler",
    "__version__",
    "count_macs",
    "flush_denormals",
    "load_sparse",
    "save_sparse",
    "to_sparse_inference",
]
__version__ = "0.1.0"

"""How a module runs at inference: engines built from the faithful net (see graph.py).

Imports only :mod:`imvec.nets` and the bottom layer (``_system``, ``_paths``); the ONNX
Runtime engine (:mod:`imvec.engines.onnx`) is imported when it is first built.
"""

from imvec.engines.graph import ENGINES, InferenceGraph, check_engine, optimize
from imvec.engines.precision import PRECISIONS, check_precision

__all__ = ["ENGINES", "PRECISIONS", "InferenceGraph", "check_engine", "check_precision",
           "optimize"]

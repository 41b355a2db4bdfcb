"""The ONNX Runtime engine: export (graphs, NCHWc channel padding), cache and sessions."""

from imvec.engines.onnx.runtime import OnnxRuntimeNet, onnxruntime_session

__all__ = ["OnnxRuntimeNet", "onnxruntime_session"]

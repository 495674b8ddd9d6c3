"""edge-infer: MQTT sensor data in, ONNX Runtime inference, predictions out."""

__version__ = "0.1.0"

__all__ = ["__version__"]

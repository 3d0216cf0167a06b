"""Low-latency runtimes for optimizers: ONNX export with parity checks. Installed as ``bpo_plugins.export``."""

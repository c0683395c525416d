"""cortex-edge: a long-memory LM (Llama-family backbone + CMS sidecar) exported to ONNX for a Raspberry Pi 5.

`import cortex_edge` is stdlib only. Subpackages: model (torch), export (torch + onnx),
quantize (NumPy, onnx lazily), runtime (NumPy + onnxruntime: what runs on the Pi).
"""

__version__ = "0.1.0"

"""Weight passes (onnxruntime.quantization, workstation) and memory-state codecs (NumPy, device)."""

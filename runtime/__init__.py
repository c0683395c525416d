"""The device side: NumPy + onnxruntime only. Loads a bundle, holds and steps the state, samples."""

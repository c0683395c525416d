"""Workstation side: torch -> ONNX, validation against torch, bundle writer."""

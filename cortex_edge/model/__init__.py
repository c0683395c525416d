"""Torch side: the Llama-family backbone, the CMS reference, the LM. Only this and export/ import torch."""

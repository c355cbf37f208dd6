"""Lightning callbacks that explain a fixed probe batch while a ViT trains and log the maps."""

from lightning_xai.callbacks.method_monitors import C2FMonitor, GradTokenMonitor
from lightning_xai.callbacks.monitor import ExplanationMonitor

__all__ = ["C2FMonitor", "ExplanationMonitor", "GradTokenMonitor"]

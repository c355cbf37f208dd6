"""Lightning callbacks that explain a fixed probe batch while a ViT trains and log the maps."""

from lightning_xai.callbacks.monitor import C2FMonitor, ExplanationMonitor, GradTokenMonitor

__all__ = ["C2FMonitor", "ExplanationMonitor", "GradTokenMonitor"]

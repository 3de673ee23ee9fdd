"""edge-agent: camera -> detector at batch 1 -> MQTT, for NVIDIA Jetson Orin fleets."""

__version__ = "0.5.10"
__all__ = ["__version__"]

"""lvface: training system for LVFace."""
__version__ = "0.1.0"

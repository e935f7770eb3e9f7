"""HoneypotNet: protect an image classifier against model extraction with a honeypot layer."""
__version__ = "0.1.0"

"""The Python client of a moefleet service."""

from .client import Client

__all__ = ["Client"]

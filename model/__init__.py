"""The CIFAR-10 network built from Ultimus blocks."""

from .net import UltimusNet
from .summary import summary

__all__ = ["UltimusNet", "summary"]

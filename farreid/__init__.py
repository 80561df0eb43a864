"""farreid: extreme far-distance aerial-ground video person re-identification."""

__version__ = "0.1.0"

"""Command-line tools around a trained checkpoint: ``farreid embed`` and ``farreid export``."""

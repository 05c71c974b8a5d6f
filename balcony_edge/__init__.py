"""balcony-edge: train, export and run Balcony exits of a decoder LLM."""

__version__ = "0.3.0"

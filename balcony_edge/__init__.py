"""balcony-edge: train, export and run Balcony exits of a decoder LLM."""

__version__ = "0.4.0"

import logging

logging.getLogger("balcony_edge").addHandler(logging.NullHandler())  # apps choose where the library's warnings go

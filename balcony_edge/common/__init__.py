"""What the torch side and the torch-free runtime share, torch-free itself: errors, paths, atomic writes, checksums,
validation of numbers, and the console and logger through which the library speaks. The runtime
(balcony_edge.runtime) imports from here and never from the torch side."""

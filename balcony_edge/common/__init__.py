"""What the torch side and the torch-free runtime share, torch-free itself: errors, paths, atomic writes, checksums
and validation of numbers. The runtime (balcony_edge.runtime) imports from here and never from the torch side."""

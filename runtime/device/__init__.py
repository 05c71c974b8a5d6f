"""Device adaptation: the signals (battery, temperature, power) and their sources, the exit controller, telemetry."""

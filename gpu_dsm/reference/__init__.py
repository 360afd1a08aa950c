"""Plain, loop-by-loop references of the batched algorithms, for tests and the device check."""

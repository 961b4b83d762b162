"""Making layers: one module per layer kind, run-layer staging and capture, and the bookkeeping merge."""

"""Graph IR, e-graph encoding, cost model, extraction and plan."""

"""Open-loop (and closed-loop) load generation against Triton and the router, with HDR histograms."""

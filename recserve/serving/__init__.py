"""The Ray Serve routing layer: gRPC/HTTP ingress, edge/cloud routing, canaries, cache, ensembles."""

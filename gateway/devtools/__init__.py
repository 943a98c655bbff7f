"""Tools for developing and demonstrating the gateway, not part of serving: the upstream
simulator (`runway-gateway simulate-upstream`) and the sample media it serves."""

"""HTTPS reverse proxy and load balancer for the conferencing nodes (SPEC §2).

Modules: request (vetting and normalisation), balancer and health (sans-I/O), pages (canned
answers), upstream (node connections and pools), server (client protocol and exchanges), core
(per-worker shared state and timers), service (listeners and worker processes), static and
accesslog (static mounts, the reference access log).
"""

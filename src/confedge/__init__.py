"""confedge: the edge of a video-conferencing deployment in one Python service.

HTTPS reverse proxy and load balancer for conferencing signalling, TURN/STUN relay for media, and
a guard against PIN brute-force guessing (what nginx + coturn + fail2ban do together).
"""

__version__ = "0.1.0"

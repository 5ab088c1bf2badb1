"""The simulated Pexip Infinity conferencing node (SPEC §7): client REST API v2 subset, SSE
events, a WebRTC echo endpoint that takes its media through the edge's TURN server, and a web
page under ``/webapp/`` to join from a browser.

``NodeSim`` is the in-process form (demo, tests); ``confedge.nodesim.cli.nodesim_command`` is
the command-line form. ``NodeState`` is the sans-I/O core both are built on.
"""

from .core import TOKEN_TTL, Conference, NodeState, TurnInfo
from .node import NodeSim

__all__ = ["TOKEN_TTL", "Conference", "NodeSim", "NodeState", "TurnInfo"]

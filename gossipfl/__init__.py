"""gossipfl: decentralized, serverless learning by gossip."""

__version__ = "0.1.0"

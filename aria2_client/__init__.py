"""The download engine: the aria2c process, its JSON-RPC, events, the poller, and uploads."""
